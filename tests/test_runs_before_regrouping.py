"""Workdirs written before the package was regrouped by role still load, sample and resume.

tests/data/runs_before_regrouping holds three tiny runs written by commit 59fa408 (the flat
module layout, stage 1's trainer key 'vitvq', the stage-1 train state class of its own) with
its make_runs.py: a tokenizer with every optional state field (discriminator, EMA, LeCam), a
class-conditional VIM on it and a classifier. Their checkpoints are read back here against an
independent reader (orbax without a target: the arrays as stored).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vim_jax import main
from vim_jax.infra import runs
from vim_jax.sampling import generation
from vim_jax.trainers import vim_step

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "runs_before_regrouping")


@pytest.fixture
def old_runs(tmp_path):
  """A copy of the old runs (resuming writes into them); the VIM run's tokenizer_workdir is
  pointed at the copy's tokenizer, as a user who moved their runs would do."""
  folder = str(tmp_path / "runs")
  shutil.copytree(FIXTURE, folder)
  path = os.path.join(folder, "vim", "config.json")
  with open(path) as f:
    config = json.load(f)
  config["tokenizer_workdir"] = os.path.join(folder, "tokenizer")
  with open(path, "w") as f:
    json.dump(config, f)
  return folder


def _stored(workdir: str, step: int = 2) -> dict:
  """The checkpoint's arrays as orbax stored them: {field: nested dict of numpy arrays}."""
  item = os.path.join(workdir, "checkpoints", str(step), "default")
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(item)


def _assert_trees_equal(actual, expected):
  flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(actual)}
  flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  assert sorted(flat_a) == sorted(flat_e)
  for key, value in flat_e.items():
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(value), err_msg=key)


def test_old_tokenizer_run_loads_with_its_renamed_trainer_and_resumes(old_runs):
  workdir = os.path.join(old_runs, "tokenizer")
  stored = _stored(workdir)
  assert sorted(k for k, v in stored.items() if v is not None) == [
      "disc_opt_state",
      "disc_params",
      "ema_params",
      "lecam_ema",
      "opt_state",
      "params",
      "step",
  ]
  config = runs.read_run_config(workdir, "tokenizer")
  assert config.trainer == "tokenizer"  # written as 'vitvq'
  tok = runs.load_tokenizer(workdir)
  assert tok.step == 2
  _assert_trees_equal(tok.params, stored["ema_params"])  # the EMA copy, which eval uses

  # The whole state (every GAN field) restores into today's TrainState, and training goes on.
  config.update(total_steps=3, eval_every=1000, fid=dict(config.fid, every=0))
  result = main.train(config, workdir, devices=jax.devices()[:1])
  assert int(result.state.step) == 3
  assert [m["step"] for m in result.train_metrics] == [3]
  assert np.isfinite(result.train_metrics[0]["loss"])
  assert runs.checkpoint_steps(workdir) == [2, 3]
  for field in ("disc_params", "ema_params", "lecam_ema"):
    assert getattr(result.state, field) is not None, field


def test_old_vim_run_loads_samples_and_resumes(old_runs):
  workdir = os.path.join(old_runs, "vim")
  stored = _stored(workdir)
  trained = runs.load_vim(workdir)
  assert trained.step == 2
  _assert_trees_equal(trained.params, stored["params"])
  labels = np.arange(4, dtype=np.int32) % trained.model.num_classes
  images = generation.Sampler(
      trained, vim_step.sampling_config_from(trained.config), batch_size=4
  ).generate(labels, seed=0)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8

  config = runs.read_run_config(workdir, "vim")
  config.update(total_steps=3, eval_every=1000)
  result = main.train(config, workdir, devices=jax.devices()[:1])
  assert int(result.state.step) == 3 and np.isfinite(result.train_metrics[-1]["loss"])


def test_old_classifier_run_loads(old_runs):
  workdir = os.path.join(old_runs, "classifier")
  model, params = runs.load_classifier(workdir)
  _assert_trees_equal(params, _stored(workdir)["params"])
  logits = model.apply({"params": params}, np.zeros((2, 32, 32, 3), np.float32))
  assert logits.shape == (2, model.num_classes)
