"""Bad periods, sizes and counts stop a run at start with a message naming the field, not with
a traceback from the loop (`--config.eval_every=0` used to end in ZeroDivisionError at
`step % config.eval_every`, after the compile)."""

import importlib.util
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from run_files import cli_env

from vim_jax.infra import config_checks

CONFIG_FILES = (
    "vitvq_base.py",
    "vitvq_small.py",
    "vitvq_large.py",
    "vim_base.py",
    "vim_large.py",
    "classifier.py",
    "quickstart.py",
    "enhancing_vitvq_base.py",
    "enhancing_vitvq_small.py",
)


def _load(name, variant=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  for key in parents:
    config = config[key]
  config[leaf] = value


def _has(config, dotted):
  for key in dotted.split("."):
    if not hasattr(config, "keys") or key not in config.keys():
      return False
    config = config[key]
  return True


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_shipped_config_passes(name):
  config_checks.check(_load(name))


def test_each_bad_value_is_named_with_what_it_must_be():
  """Every checked field of the stage-1, stage-2 and quickstart configs, with each bad value."""
  bad_values = {
      **{f: (0, -3) for f in config_checks.POSITIVE},
      **{f: (0, -2) for f in config_checks.COUNT_OR_ALL},
      **{f: (-1,) for f in config_checks.PERIOD_OR_OFF},
  }
  checked = set()
  for name in ("vitvq_base.py", "vim_base.py", "classifier.py", "quickstart.py"):
    for field, values in bad_values.items():
      for value in values:
        config = _load(name)
        if not _has(config, field):
          continue
        _set(config, field, value)
        with pytest.raises(config_checks.ConfigValueError) as error:
          config_checks.check(config)
        message = str(error.value)
        assert f"config.{field}={value!r} must be" in message, (name, field, message)
        assert f"--config.{field}=" in message  # the fix
        checked.add(field)
  assert checked == set(bad_values), set(bad_values) - checked  # no field left unwalked
  # 0 turns periodic FID off; -1 stands for the whole split.
  config = _load("vim_base.py")
  config.fid.every = 0
  config.num_eval_images = -1
  config_checks.check(config)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("acceptance", 0.0, "in (0, 1]"),
        ("acceptance", 1.5, "in (0, 1]"),
        ("stage2.label_dropout", 1.0, "in [0, 1)"),
        ("stage2.sampling.temperature", -0.5, ">= 0"),
        ("stage2.sampling.top_k", -1, "a whole number >= 0"),
        ("stage2.sampling.top_p", 0.0, "in (0, 1]"),
    ],
)
def test_ranges_and_the_quickstart_stages_are_checked_at_once(field, value, words):
  """The quickstart's stage configs are checked before stage 1 trains."""
  config = _load("quickstart.py")
  _set(config, field, value)
  config.stage1.eval_every = 0  # every problem is listed, not only the first
  with pytest.raises(config_checks.ConfigValueError) as error:
    config_checks.check(config)
  assert f"config.{field}={value!r} must be {words}" in str(error.value)
  assert "config.stage1.eval_every=0" in str(error.value)


def test_trainers_refuse_before_writing_anything(tmp_path):
  from configs import vim_base
  from vim_jax.trainers import vim as vim_trainer

  config = vim_base.get_config("tiny")
  config.update(eval_every=0, tokenizer_workdir=str(tmp_path / "no_tokenizer"))
  with pytest.raises(config_checks.ConfigValueError, match="config.eval_every=0"):
    vim_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_cli_says_which_field_and_exits_before_start_up(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.main",
          f"--config={REPO_ROOT}/configs/vim_base.py:tiny",
          "--workdir=workdirs/never",
          "--config.eval_every=0",
          "--config.batch_size=0",
      ],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=300,
      env={**cli_env(), "PYTHONPATH": REPO_ROOT},
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: bad config values:" in proc.stderr
  assert (
      "config.eval_every=0 must be a whole number >= 1 (to evaluate only at the end, set it "
      "to total_steps)" in proc.stderr
  )
  assert "config.batch_size=0 must be a whole number >= 1" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "workdirs").exists()
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.sample", "--workdir=workdirs/vim", "--num_samples=0"],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=300,
      env={**cli_env(), "PYTHONPATH": REPO_ROOT},
  )
  assert proc.returncode != 0 and "--num_samples=0" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_an_unknown_dropout_prng_is_named_with_the_choices():
  """config.dropout_rng (stage 1, stage 2, and the quickstart's stages) takes the names in
  vim_jax/infra/prng.py alone; a misspelt one stops the run at start, naming it and the choices."""
  from vim_jax.infra import prng

  for name, field in (
      ("vitvq_base.py", "dropout_rng"),
      ("vim_base.py", "dropout_rng"),
      ("quickstart.py", "stage1.dropout_rng"),
      ("quickstart.py", "stage2.dropout_rng"),
  ):
    config = _load(name)
    _set(config, field, "philox")
    with pytest.raises(config_checks.ConfigValueError) as error:
      config_checks.check(config)
    assert f"config.{field}='philox' must be one of auto, threefry, rbg, unsafe_rbg" in str(
        error.value
    ), (name, str(error.value))
  config = _load("vim_base.py")
  for value in prng.DROPOUT_RNGS:
    config.dropout_rng = value
    config_checks.check(config)
