"""Stage 2 end to end on tiny configs: trainer (1 vs 8 devices, resume), sampling CLI pieces,
rejection sampling, linear probe, schedule."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import vim_base
from vim_jax import generation, optim, probe, runs, token_sampling, train_vim

from conftest import REPO_ROOT, tiny_vim_config


_vim_config = tiny_vim_config


def _flat(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_eight_devices_fsdp_tensor_match_one(tokenizer_dir, tmp_path):
  config = _vim_config(tokenizer_dir)
  one = train_vim.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  eight = train_vim.train_and_evaluate(config, str(tmp_path / "eight"))
  for a, b in zip(one.train_metrics, eight.train_metrics):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(_flat(one.state), _flat(eight.state))) < 1e-5
  head = eight.state.params["head"]["kernel"]
  assert head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_resume_is_exact_and_eval_writes_samples(tokenizer_dir, tmp_path):
  config = _vim_config(tokenizer_dir, steps=4)
  config.eval_every = 4
  straight = train_vim.train_and_evaluate(config, str(tmp_path / "a"))
  train_vim.train_and_evaluate(config, str(tmp_path / "b"), should_stop=lambda s: s == 2)
  resumed = train_vim.train_and_evaluate(config, str(tmp_path / "b"))
  assert [m["step"] for m in resumed.train_metrics] == [3, 4]
  for a, b in zip(_flat(straight.state), _flat(resumed.state)):
    np.testing.assert_array_equal(a, b)
  m = resumed.eval_metrics
  assert m["num_images"] == 32 and m["bits_per_token"] == pytest.approx(m["loss"] / np.log(2))
  assert os.path.exists(tmp_path / "b" / "images" / "samples_00000004.png")
  assert {"bits_per_token", "tokens_per_sec_per_device", "tflops_per_sec_per_device"} <= set(
      resumed.train_metrics[-1])


def test_missing_or_wrong_tokenizer_is_a_clear_error(tokenizer_dir, tmp_path):
  config = _vim_config(str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match="no stage-1 run"):
    train_vim.train_and_evaluate(config, str(tmp_path / "x"))
  config = _vim_config(tokenizer_dir)
  config.image_size = 64
  with pytest.raises(ValueError, match="trained at 32"):
    train_vim.train_and_evaluate(config, str(tmp_path / "y"))


def test_sampling_with_rejection_writes_outputs(vim_dir, classifier_dir, tmp_path):
  trained = runs.load_vim(vim_dir)
  labels = generation.requested_labels(12, trained.model.num_classes, "")
  np.testing.assert_array_equal(labels[:7], [0, 1, 2, 3, 4, 5, 0])
  out = str(tmp_path / "samples")
  results = generation.sample_and_report(trained, out, labels, seed=1,
                                     sampling_config=token_sampling.SamplingConfig(),
                                     classifier_workdir=classifier_dir, acceptance=0.5)
  assert 0 <= results["class_accuracy"] <= 1 and 0 <= results["class_accuracy_rejection"] <= 1
  data = np.load(os.path.join(out, "samples.npz"))
  assert data["images"].shape == (12, 32, 32, 3) and data["images"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], labels)
  assert json.load(open(os.path.join(out, "results.json")))["num_samples"] == 12
  # Same seed, same samples.
  again = generation.generate(trained, labels, 1, token_sampling.SamplingConfig())
  np.testing.assert_array_equal(again, data["images"])
  # Rejection keeps, per class, the candidates with the highest probability of that class.
  classifier, cparams = runs.load_classifier(classifier_dir)
  kept, scores = generation.rejection_sample(trained, labels, 1, token_sampling.SamplingConfig(),
                                         classifier, cparams, acceptance=0.5)
  probs = generation.class_probabilities(classifier, cparams, kept)
  np.testing.assert_allclose(probs[np.arange(12), labels], scores, rtol=1e-5)
  candidates = generation.generate(trained, np.zeros(4, np.int32), 1 * 1009 + 0,
                               token_sampling.SamplingConfig())
  p0 = generation.class_probabilities(classifier, cparams, candidates)[:, 0]
  np.testing.assert_allclose(np.sort(scores[labels == 0])[::-1], np.sort(p0)[::-1][:2], rtol=1e-5)
  with pytest.raises(ValueError, match="classes \\[9\\]"):
    generation.requested_labels(4, 6, "1,9")


def test_sample_cli(vim_dir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.sample", f"--workdir={vim_dir}", "--num_samples=6",
       f"--out={tmp_path}", "--temperature=0"], cwd=REPO_ROOT, env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.exists(tmp_path / "samples.png") and os.path.exists(tmp_path / "samples.npz")


def test_linear_probe_on_separable_features_and_on_vim(vim_dir):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 16)) * 3
  y = rng.integers(0, 3, 600)
  x = centres[y] + rng.normal(size=(600, 16))
  acc = probe.train_linear_probe(x[:400], y[:400], x[400:], y[400:], 3, steps=300,
                                 batch_size=64, lr=1e-2)
  assert acc > 0.95
  results = probe.run_probe(vim_dir, blocks=[1, 2])
  assert set(results) == {1, 2} and all(0 <= v <= 1 for v in results.values())
  assert "| 1 of 2 |" in probe.format_table(results, 2)


def test_vim_schedule():
  cfg = vim_base.get_config().optimizer
  schedule = optim.warmup_exponential_schedule(cfg, 450_000)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5_000)) == pytest.approx(4.5e-4)
  assert float(schedule(80_000)) == pytest.approx(4.5e-4)
  assert float(schedule(450_000)) == pytest.approx(1e-5, rel=1e-3)
  mid = float(schedule(265_000))  # exponential: the geometric mean halfway through the decay
  assert mid == pytest.approx((4.5e-4 * 1e-5) ** 0.5, rel=1e-3)


def test_pretokenized_tokens_match_and_train(tokenizer_dir, tmp_path):
  from vim_jax.data import sources
  from vim_jax.tools import pretokenize
  config = _vim_config(tokenizer_dir)
  config.data.update(shapes_train_size=40, shapes_eval_size=24)
  out = str(tmp_path / "tokens")
  meta = pretokenize.pretokenize(config, out, shard_size=16)
  assert meta["counts"] == {"train": 40, "eval": 24} and meta["num_classes"] == 6
  tokens = sources.TokenSource(out, "train")
  assert len(tokens) == 40 and len(os.listdir(out)) > 4  # several shards
  # Shard contents equal the tokenizer applied to the same (centre-cropped) images.
  tok = runs.load_tokenizer(tokenizer_dir)
  images = sources.build_source(config.data, "train", 32, config.seed)
  from vim_jax.data import preprocess
  batch = np.stack([preprocess.preprocess_image(images[i]["image"], 32, None, False)
                    for i in (0, 17, 39)])
  expected = tok.model.apply({"params": tok.params}, batch, method=tok.model.encode_to_indices)
  for j, i in enumerate((0, 17, 39)):
    np.testing.assert_array_equal(tokens[i]["tokens"], np.asarray(expected[j]).reshape(-1))
    assert tokens[i]["label"] == images[i]["label"]
  # Stage 2 trains on them.
  config.data.update(source="tokens", tokens_dir=out)
  result = train_vim.train_and_evaluate(config, str(tmp_path / "vim"))
  assert int(result.state.step) == 2 and np.isfinite(result.train_metrics[-1]["loss"])
