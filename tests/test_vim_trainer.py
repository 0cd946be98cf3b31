"""Stage 2 end to end on tiny configs: trainer (1 vs 8 devices, resume), sampling CLI pieces,
rejection sampling, linear probe, schedule."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import stacks
from conftest import REPO_ROOT, tiny_vim_config
from run_compare import assert_same_metrics, assert_states_close
from run_files import cli_env

from configs import vim_base
from vim_jax import probe
from vim_jax.data import preprocess
from vim_jax.infra import parallel, runs
from vim_jax.models import vim as vim_lib
from vim_jax.sampling import autoregressive, generation
from vim_jax.trainers import optim, train_state, vim_step
from vim_jax.trainers import vim as vim_trainer

_vim_config = tiny_vim_config


@pytest.fixture(scope="module")
def one_device_vim_run(tokenizer_dir, tmp_path_factory):
  """A float32 run on 1 device, the reference of the mesh and precision tests."""
  return vim_trainer.train_and_evaluate(
      _vim_config(tokenizer_dir), str(tmp_path_factory.mktemp("vim_one")), devices=jax.devices()[:1]
  )


def test_paper_precision_bf16_and_remat_trains_close_to_float32(
    one_device_vim_run, tokenizer_dir, tmp_path
):
  """VIM's paper settings (bfloat16 compute, remat) at tiny size: float32 params, and the first
  step's loss and gradient norm within what bfloat16 rounding explains of the float32 run's."""
  config = _vim_config(tokenizer_dir)
  config.model.update(dtype="bfloat16", remat_policy="minimal")
  run = vim_trainer.train_and_evaluate(config, str(tmp_path / "bf16"), devices=jax.devices()[:1])
  assert {leaf.dtype for leaf in jax.tree.leaves(run.state.params)} == {np.dtype("float32")}
  # bf16 keeps 8 significant bits: a rounding is within u = 2^-8 = 3.9e-3, relative, uniformly
  # (std u / sqrt 3). Along the deepest path (the embedding, 2 blocks of about 11 rounded ops,
  # the head's input) some k = 24 roundings compound, as a random walk, to u sqrt(k / 3) = 2.8u
  # on an activation or a cotangent.
  # - Loss: a token's nll = lse(z) - z_t moves by at most 2 max |dz|, about 2 x 2.8u x 0.5 (the
  #   logits' rms at init) = 1.1e-2 on ln 256 = 5.5: 2e-3 relative, before the mean over the
  #   batch's 1024 tokens averages the independent part of it away.
  # - Gradient norm: an entry sums products of a cotangent and an activation, each 2.8u off:
  #   sqrt(2) x 2.8u = 4u relative, and the norm is off by at most their g^2-weighted RMS. (A
  #   sum that cancels errs more relative to itself, e.g. the value bias's, the sum over
  #   positions of P^T dout, whose bf16 rows of P sum to 1 within u; it weighs little here.)
  # Measured: 8e-5 and 1.3e-3. The former rel=3e-2 passed any bf16-only error under 3%.
  for key, rel in (("loss", 2e-3), ("grad_norm", 4 * 2.0**-8)):
    assert run.train_metrics[0][key] == pytest.approx(
        one_device_vim_run.train_metrics[0][key], rel=rel
    ), key


def test_eight_devices_fsdp_tensor_match_one(one_device_vim_run, tokenizer_dir, tmp_path):
  config = _vim_config(tokenizer_dir)
  one = one_device_vim_run
  config.mesh.update(data=2, fsdp=2, tensor=2)
  eight = vim_trainer.train_and_evaluate(config, str(tmp_path / "eight"))
  assert len(one.train_metrics) == 2
  assert_same_metrics(one.train_metrics, eight.train_metrics, keys=("loss", "grad_norm"))
  assert_states_close(one.state, eight.state, param_atol=config.optimizer.peak_lr)
  head = eight.state.params["head"]["kernel"]
  assert head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_resume_is_exact_and_eval_writes_samples(tokenizer_dir, tmp_path):
  config = _vim_config(tokenizer_dir, steps=4)
  config.eval_every = 4
  one = jax.devices()[:1]  # resuming does not depend on the layout; 8 devices only cost time
  straight = vim_trainer.train_and_evaluate(config, str(tmp_path / "a"), devices=one)
  vim_trainer.train_and_evaluate(
      config, str(tmp_path / "b"), should_stop=lambda s: s == 2, devices=one
  )
  resumed = vim_trainer.train_and_evaluate(config, str(tmp_path / "b"), devices=one)
  assert [m["step"] for m in resumed.train_metrics] == [3, 4]
  assert_same_metrics(straight.train_metrics[2:], resumed.train_metrics, rel=0)
  assert_states_close(straight.state, resumed.state, rel=0.0)  # params and Adam, bit for bit
  m = resumed.eval_metrics
  assert m["num_images"] == 32 and m["bits_per_token"] == pytest.approx(m["loss"] / np.log(2))
  assert os.path.exists(tmp_path / "b" / "images" / "samples_00000004.png")
  assert {"bits_per_token", "tokens_per_sec_per_device", "tflops_per_sec_per_device"} <= set(
      resumed.train_metrics[-1]
  )


def test_missing_or_wrong_tokenizer_is_a_clear_error(tokenizer_dir, tmp_path):
  config = _vim_config(str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match="no stage-1 run"):
    vim_trainer.train_and_evaluate(config, str(tmp_path / "x"))
  config = _vim_config(tokenizer_dir)
  config.image_size = 64
  with pytest.raises(ValueError, match="trained at 32"):
    vim_trainer.train_and_evaluate(config, str(tmp_path / "y"))


def test_sampling_with_rejection_writes_outputs(vim_dir, classifier_dir, tmp_path):
  trained = runs.load_vim(vim_dir)
  labels = generation.requested_labels(12, trained.model.num_classes, "")
  np.testing.assert_array_equal(labels[:7], [0, 1, 2, 3, 4, 5, 0])
  out = str(tmp_path / "samples")
  results = generation.sample_and_report(
      trained,
      out,
      labels,
      seed=1,
      sampling_config=autoregressive.SamplingConfig(),
      classifier_workdir=classifier_dir,
      acceptance=0.5,
  )
  data = np.load(os.path.join(out, "samples.npz"))
  assert data["images"].shape == (12, 32, 32, 3) and data["images"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], labels)
  # The accuracies: the classifier's argmax on the saved images, counted here.
  classifier, cparams = runs.load_classifier(classifier_dir)
  for key, name in (
      ("class_accuracy", "samples.npz"),
      ("class_accuracy_rejection", "samples_rejection.npz"),
  ):
    saved = np.load(os.path.join(out, name))
    predicted = np.argmax(generation.class_probabilities(classifier, cparams, saved["images"]), -1)
    assert results[key] == np.mean(predicted == saved["labels"]), key
  assert json.load(open(os.path.join(out, "results.json")))["num_samples"] == 12
  # Same seed, same samples.
  again = generation.generate(trained, labels, 1, autoregressive.SamplingConfig())
  np.testing.assert_array_equal(again, data["images"])
  # Rejection keeps, per class, the candidates with the highest probability of that class.
  kept, scores = generation.rejection_sample(
      trained, labels, 1, autoregressive.SamplingConfig(), classifier, cparams, acceptance=0.5
  )
  probs = generation.class_probabilities(classifier, cparams, kept)
  np.testing.assert_allclose(probs[np.arange(12), labels], scores, rtol=1e-5)
  candidates = generation.generate(
      trained, np.zeros(4, np.int32), 1 * 1009 + 0, autoregressive.SamplingConfig()
  )
  p0 = generation.class_probabilities(classifier, cparams, candidates)[:, 0]
  np.testing.assert_allclose(np.sort(scores[labels == 0])[::-1], np.sort(p0)[::-1][:2], rtol=1e-5)
  with pytest.raises(ValueError, match="classes \\[9\\]"):
    generation.requested_labels(4, 6, "1,9")


def test_probe_cli_prints_and_writes_the_in_process_result(vim_dir):
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.probe", f"--workdir={vim_dir}", "--blocks=1"],
      cwd=REPO_ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Closing _NonBlockingMetadataStore" not in proc.stderr  # the log filter
  written = json.load(open(os.path.join(vim_dir, "probe.json")))
  assert written.keys() == {"1"}
  # The same features and seed in this process (8 devices) give the same top-1.
  assert written["1"] == pytest.approx(probe.run_probe(vim_dir, blocks=[1])[1], abs=1e-9)
  assert f"| 1 of 2 | {100 * written['1']:.1f}% |" in proc.stdout


def test_probe_refuses_a_conditional_vim_trained_without_label_dropout(vim_dir, tmp_path):
  """Its null condition, the probe's input, was never trained: refused by name, in the API
  and the CLI, before anything loads. The same run with label_dropout > 0 passes the check."""
  config = json.load(open(os.path.join(vim_dir, "config.json")))
  assert config["model"]["num_classes"] > 0 and config["label_dropout"] > 0
  probe.check_null_condition_trained(runs.read_run_config(vim_dir), vim_dir)
  workdir = str(tmp_path / "no_dropout")
  os.makedirs(workdir)
  json.dump({**config, "label_dropout": 0.0}, open(os.path.join(workdir, "config.json"), "w"))
  with pytest.raises(probe.UntrainedNullCondition, match="label_dropout=0.0"):
    probe.run_probe(workdir)
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.probe", f"--workdir={workdir}"],
      cwd=REPO_ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 1
  assert (
      "error: " in proc.stderr
      and "null condition" in proc.stderr
      and "Traceback" not in (proc.stderr)
  )
  unconditional = {**config, "label_dropout": 0.0, "model": {**config["model"], "num_classes": 0}}
  probe.check_null_condition_trained(ml_collections.ConfigDict(unconditional), workdir)


def test_sample_cli(vim_dir, tmp_path):
  env = cli_env()
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.sample",
          f"--workdir={vim_dir}",
          "--num_samples=6",
          f"--out={tmp_path}",
          "--temperature=0",
      ],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.exists(tmp_path / "samples.png") and os.path.exists(tmp_path / "samples.npz")


def test_probe_features_are_a_blocks_sequence_mean_without_labels(vim_dir):
  """Features of block b = the mean over positions of block b's output (flax's captured
  intermediates of a plain forward pass) on the image's tokens with the null class; the
  image's own label would give other values. run_probe defaults to config.probe.block and the
  last block."""
  from vim_jax.data import pipeline, sources
  from vim_jax.models import tokenizer as tokenizer_lib

  trained = runs.load_vim(vim_dir)
  config, model, tok = trained.config, trained.model, trained.tokenizer
  source = sources.build_source(config.data, "eval", config.image_size, config.seed)
  data = pipeline.InputPipeline(
      source, 16, config.image_size, config.seed, train=False, num_workers=1, max_examples=16
  )
  feats, labels = probe.extract_features(trained, data, [1, 2])
  batch = next(data.iterate())
  np.testing.assert_array_equal(labels, batch["label"])
  tokens = tok.model.apply(
      {"params": tok.params},
      preprocess.from_uint8(batch["image"]),
      method=tokenizer_lib.ViTVQGAN.encode_to_indices,
  ).reshape(16, -1)
  # The reference runs the same weights through the unrolled stack, whose blocks flax can
  # capture one by one (the trained model scans its layers).
  import dataclasses

  unrolled = dataclasses.replace(model, stack=dataclasses.replace(model.stack, scan_layers=False))
  stacked = trained.params["transformer"]["layers"]["block"]
  blocks = {
      f"block_{i:02d}": jax.tree.map(lambda x: x[i], stacked) for i in range(model.stack.num_layers)
  }
  params = {
      **trained.params,
      "transformer": {"ln_final": trained.params["transformer"]["ln_final"], **blocks},
  }
  for label_kind in ("null", "own"):
    cond = np.full(16, model.null_label) if label_kind == "null" else batch["label"]
    _, captured = unrolled.apply({"params": params}, tokens, cond, capture_intermediates=True)
    for b in (1, 2):
      block_out = np.asarray(
          captured["intermediates"]["transformer"][f"block_{b - 1:02d}"]["__call__"][0], np.float64
      )
      close = np.allclose(feats[b], block_out.mean(axis=1), rtol=1e-4, atol=1e-5)
      assert close == (label_kind == "null"), (label_kind, b)
  assert set(probe.run_probe(vim_dir)) == {config.probe.block, model.stack.num_layers} == {1, 2}


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

  config = _vim_config(tokenizer_dir)
  config.data.update(shapes_train_size=40, shapes_eval_size=24)
  out = str(tmp_path / "tokens")
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.tools.pretokenize",
          "--config=configs/vim_base.py:tiny",
          f"--config.tokenizer_workdir={tokenizer_dir}",
          "--config.data.shapes_train_size=40",
          "--config.data.shapes_eval_size=24",
          f"--out={out}",
          "--shard_size=16",
      ],
      cwd=REPO_ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Closing _NonBlockingMetadataStore" not in proc.stderr  # the log filter
  meta = json.loads(proc.stdout[proc.stdout.index("{") :])
  assert meta["counts"] == {"train": 40, "eval": 24} and meta["num_classes"] == 6
  tokens = sources.TokenSource(out, "train")
  assert len(tokens) == 40 and len(os.listdir(out)) > 4  # several shards
  # Shard contents equal the tokenizer applied to the same (centre-cropped) images.
  tok = runs.load_tokenizer(tokenizer_dir)
  images = sources.build_source(config.data, "train", 32, config.seed)
  batch = preprocess.from_uint8(
      np.stack(
          [preprocess.preprocess_image(images[i]["image"], 32, None, False) for i in (0, 17, 39)]
      )
  )
  expected = tok.model.apply({"params": tok.params}, batch, method=tok.model.encode_to_indices)
  for j, i in enumerate((0, 17, 39)):
    np.testing.assert_array_equal(tokens[i]["tokens"], np.asarray(expected[j]).reshape(-1))
    assert tokens[i]["label"] == images[i]["label"]
  # Stage 2 trains on them.
  config.data.update(source="tokens", tokens_dir=out)
  result = vim_trainer.train_and_evaluate(config, str(tmp_path / "vim"), devices=jax.devices()[:1])
  assert int(result.state.step) == 2 and np.isfinite(result.train_metrics[-1]["loss"])


# --- Stage 2's step functions on a tiny VIM over given tokens (no tokenizer run needed) ------
_NUM_CLASSES, _VOCAB, _TOKENS = 6, 16, 8
_SEEN_LABELS = []  # the labels each apply of a _LabelRecordingVIM was given, in call order


class _LabelRecordingVIM(vim_lib.VIM):
  """A VIM that records, from inside the compiled step, the labels its forward pass uses."""

  def _labels(self, labels, batch):
    if labels is not None:
      jax.debug.callback(lambda x: _SEEN_LABELS.append(np.asarray(x)), labels)
    return super()._labels(labels, batch)


@functools.lru_cache(maxsize=None)
def _tiny_stage2(dropout=0.0, label_dropout=0.0, recording=False):
  """(model, fresh train state, jitted train step, jitted eval step) on tokens int [B, 8]; built
  once per argument set (the tests share compiled steps). Dropout has no params: every variant
  starts from the same ones."""
  stack = stacks.stack(
      num_layers=2, width=32, num_heads=2, head_dim=16, mlp_dim=64, dropout=dropout, causal=True
  )
  cls = _LabelRecordingVIM if recording else vim_lib.VIM
  model = stacks.vim(
      cls, stack=stack, vocab_size=_VOCAB, num_tokens=_TOKENS, num_classes=_NUM_CLASSES
  )
  params = _tiny_vim_params()
  config = ml_collections.ConfigDict(
      dict(seed=0, dropout_rng="auto", label_dropout=label_dropout, grad_accum_steps=1)
  )
  tx, schedule = optax.sgd(1e-2), optax.constant_schedule(1e-2)
  state = train_state.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  train_step = jax.jit(vim_step.make_train_step(model, None, tx, schedule, config))
  eval_step = jax.jit(vim_step.make_eval_step(model, None))
  return model, state, train_step, eval_step


@functools.lru_cache(maxsize=None)
def _tiny_vim_params():
  stack = stacks.stack(num_layers=2, width=32, num_heads=2, head_dim=16, mlp_dim=64, causal=True)
  model = stacks.vim(stack=stack, vocab_size=_VOCAB, num_tokens=_TOKENS, num_classes=_NUM_CLASSES)
  init = jax.jit(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((2, _TOKENS), jnp.int32), jnp.zeros((2,), jnp.int32)
      )
  )
  return nn.meta.unbox(init())["params"]


def _token_batch(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "tokens": jnp.asarray(rng.integers(0, _VOCAB, (batch_size, _TOKENS)), jnp.int32),
      "label": jnp.asarray(rng.integers(0, _NUM_CLASSES, batch_size), jnp.int32),
  }


def _recorded_labels(fn, *args):
  _SEEN_LABELS.clear()
  jax.block_until_ready(fn(*args))
  jax.effects_barrier()
  assert _SEEN_LABELS, "the model was never given labels"
  return [np.asarray(x) for x in _SEEN_LABELS]


def test_label_dropout_replaces_a_fraction_p_of_labels_by_the_null_class_in_training_only():
  """With label_dropout p, the labels the train step's forward pass uses are each the example's
  own or the null class (id num_classes, not 0), with the null class on a number of examples
  within 5 binomial standard deviations sqrt(B p (1 - p)) of B p; another step draws another
  mask. The eval step and the sampler use the labels as given. An inverted mask (B (1 - p)
  nulls), no dropout (none) or label 0 for the null class each fail here."""
  p, b = 0.2, 1024
  model, state, train_step, eval_step = _tiny_stage2(label_dropout=p, recording=True)
  batch = _token_batch(b)
  labels, null = np.asarray(batch["label"]), model.null_label
  assert null == _NUM_CLASSES and not np.any(labels == null)
  masks = []
  for step in (0, 1):
    (seen,) = _recorded_labels(train_step, state.replace(step=jnp.int32(step)), batch, None)
    assert np.all((seen == labels) | (seen == null)), "a label became neither itself nor null"
    dropped = seen == null
    assert abs(dropped.sum() - b * p) <= 5 * np.sqrt(b * p * (1 - p)), (step, dropped.sum())
    masks.append(dropped)
  assert not np.array_equal(*masks), "every step drops the same rows"
  (seen,) = _recorded_labels(eval_step, state.params, batch, None)
  np.testing.assert_array_equal(seen, labels)
  requested = jnp.asarray(labels[:4])
  for seen in _recorded_labels(
      lambda: autoregressive.sample_tokens(model, state.params, requested, jax.random.key(0))
  ):
    np.testing.assert_array_equal(seen, labels[:4])


def test_the_train_step_runs_dropout_and_the_eval_step_does_not():
  """With the stack's dropout at 0.5, the train step's loss depends on its dropout key (folded
  from the step: the same step gives the same loss, another step another), and differs from the
  eval step's, which is deterministic. With dropout 0 the train step's loss is the eval step's
  per-example nll averaged (the same function), so the difference above is dropout's alone.
  `deterministic=True` in the train step fails here."""
  batch = _token_batch(8)
  _, state, train_step, eval_step = _tiny_stage2(dropout=0.5)
  loss = lambda step: float(train_step(state.replace(step=jnp.int32(step)), batch, None)[1]["loss"])
  losses = [loss(0), loss(0), loss(1)]
  assert losses[0] == losses[1] and losses[0] != losses[2], losses
  first, second = (eval_step(state.params, batch, None)["nll"] for _ in range(2))
  np.testing.assert_array_equal(first, second)
  assert abs(losses[0] - float(np.mean(first))) > 1e-3, (losses, float(np.mean(first)))
  _, state, train_step, eval_step = _tiny_stage2()  # the cached dropout-free steps
  no_dropout = float(train_step(state, batch, None)[1]["loss"])
  assert no_dropout == pytest.approx(
      float(np.mean(eval_step(state.params, batch, None)["nll"])), rel=1e-6
  )


class _EvalBatches:
  """An eval pipeline's interface over given local batches (one process, one device)."""

  def __init__(self, batches):
    self.batches, self.global_batch_size = batches, len(batches[0]["label"])

  def iterate(self):
    yield from self.batches


def test_the_eval_loss_is_the_mean_over_unpadded_examples():
  """vim_step.evaluate over two batches of 8, the second padded after 3 examples (mask 0, with
  other tokens and labels): loss, accuracy and num_images are the means and the count over the
  11 real examples of each example's cross-entropy and next-token accuracy, computed here in
  float64 from the full forward pass's logits. Counting the padded rows fails here."""
  model, state, _, eval_step = _tiny_stage2()
  first, second = _token_batch(8, seed=1), _token_batch(8, seed=2)
  second["tokens"] = second["tokens"].at[3:].set(0)
  second["label"] = second["label"].at[3:].set(0)
  batches = [
      {**{k: np.asarray(v) for k, v in b.items()}, "mask": np.asarray(m, np.float32)}
      for b, m in ((first, [1] * 8), (second, [1] * 3 + [0] * 5))
  ]
  mesh = parallel.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  metrics = vim_step.evaluate(eval_step, state.params, None, _EvalBatches(batches), mesh)
  tokens = np.concatenate([first["tokens"], second["tokens"][:3]])
  labels = np.concatenate([first["label"], second["label"][:3]])
  logits = np.asarray(
      model.apply({"params": state.params}, jnp.asarray(tokens), jnp.asarray(labels)), np.float64
  )
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0].mean(-1)  # [11]
  accuracy = (logits.argmax(-1) == tokens).mean(-1)
  assert metrics["num_images"] == 11
  assert metrics["loss"] == pytest.approx(nll.mean(), rel=1e-6)
  assert metrics["bits_per_token"] == pytest.approx(nll.mean() / np.log(2), rel=1e-6)
  assert metrics["accuracy"] == pytest.approx(accuracy.mean(), abs=1e-9)
