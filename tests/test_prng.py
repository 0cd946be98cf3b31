"""The dropout PRNG switch (config.dropout_rng, vim_jax/infra/prng.py): which implementation each
setting gives where, the masks it draws, the libtpu flag, and exact resume under rbg."""

import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import stacks
from conftest import tiny_vim_config
from run_compare import assert_same_metrics, assert_states_close
from test_vim_trainer import _NUM_CLASSES, _TOKENS, _VOCAB, _tiny_vim_params, _token_batch

from vim_jax.infra import prng
from vim_jax.trainers import train_state, vim_step
from vim_jax.trainers import vim as vim_trainer


def _config(setting, seed=0):
  return ml_collections.ConfigDict(dict(seed=seed, dropout_rng=setting))


def test_auto_is_rbg_on_tpu_and_threefry_elsewhere():
  for platform in ("cpu", "gpu", "cuda", "rocm", "tpu"):
    assert prng.impl_for("auto", platform) == ("rbg" if platform == "tpu" else "threefry2x32")
    assert prng.impl_for("threefry", platform) == "threefry2x32"
    assert prng.impl_for("rbg", platform) == "rbg"
    assert prng.impl_for("unsafe_rbg", platform) == "unsafe_rbg"
  with pytest.raises(ValueError, match=r"config.dropout_rng='rgb' .*auto, threefry, rbg"):
    prng.impl_for("rgb", "tpu")
  key = prng.dropout_key(_config("auto"), "tpu")
  assert str(jax.random.key_impl(key)) == "rbg"


def _traced_impl(config):
  """The implementation of the key dropout_key makes while a function is traced."""
  seen = []

  def fn(x):
    seen.append(str(jax.random.key_impl(prng.dropout_key(config))))
    return x

  jax.jit(fn).trace(jax.ShapeDtypeStruct((4,), jnp.float32))
  return seen[0]


def test_the_key_follows_the_platform_of_the_mesh_it_is_traced_for():
  """'auto' reads the mesh set for tracing, not the host's default backend: a step traced for a
  TPU slice on this CPU host (compile_report, libtpu's compile-only devices) draws from rbg; on
  a CPU mesh, or with no mesh (the default backend, CPU here), from threefry."""
  from jax.sharding import Mesh

  from vim_jax.infra import tpu_slices

  config = _config("auto")
  tpu = Mesh(np.array(tpu_slices.compile_only_devices(tpu_slices.parse("v4-8"))), ("data",))
  with jax.set_mesh(tpu):
    assert _traced_impl(config) == "rbg"
  with jax.set_mesh(Mesh(np.array(jax.devices()[:2]), ("data",))):
    assert _traced_impl(config) == "threefry2x32"
  assert _traced_impl(config) == "threefry2x32"
  with jax.set_mesh(tpu):
    assert _traced_impl(_config("threefry")) == "threefry2x32"
  assert _traced_impl(_config("unsafe_rbg")) == "unsafe_rbg"


def _masks(setting, steps=(0, 0, 1)):
  """Dropout(0.5) keep-masks [len(steps), 64, 64] drawn as the train steps key them: the
  config's key, folded with the step (a traced int32), split, folded with a microbatch index."""

  @jax.jit
  def mask(step):
    rng = jax.random.fold_in(prng.dropout_key(_config(setting)), step)
    _, dropout_rng = jax.random.split(rng)
    rng = jax.random.fold_in(dropout_rng, jnp.int32(1))
    return (
        nn.Dropout(0.5).apply({}, jnp.ones((64, 64)), deterministic=False, rngs={"dropout": rng})
        != 0
    )

  return np.stack([np.asarray(mask(jnp.int32(s))) for s in steps])


def test_rbg_and_threefry_draw_different_masks_each_deterministically():
  masks = {setting: _masks(setting) for setting in ("threefry", "rbg", "unsafe_rbg")}
  for setting, (first, again, next_step) in masks.items():
    np.testing.assert_array_equal(first, again, err_msg=setting)  # same step, same mask
    assert not np.array_equal(first, next_step), setting  # the step is folded in
    # Keep rate 0.5 within 5 binomial standard deviations over 4096 draws.
    assert abs(first.mean() - 0.5) < 5 * 0.5 / 64, (setting, first.mean())
  assert not np.array_equal(masks["threefry"][0], masks["rbg"][0])
  assert not np.array_equal(masks["rbg"][0], masks["unsafe_rbg"][0])
  # 'auto' on this CPU host is threefry, bit for bit.
  np.testing.assert_array_equal(_masks("auto"), masks["threefry"])


def test_the_stage2_train_step_draws_dropout_from_the_configs_prng():
  """The train step (dropout 0.5, label dropout 0.3) keyed by config.dropout_rng: the same step
  gives the same loss under each setting, the next step another, and rbg another than threefry.
  The parameters' init key is not the dropout key: they are the same under every setting."""
  stack = stacks.stack(
      num_layers=2, width=32, num_heads=2, head_dim=16, mlp_dim=64, dropout=0.5, causal=True
  )
  model = stacks.vim(stack=stack, vocab_size=_VOCAB, num_tokens=_TOKENS, num_classes=_NUM_CLASSES)
  params = _tiny_vim_params()
  tx, schedule = optax.sgd(1e-2), optax.constant_schedule(1e-2)
  state = train_state.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  batch = _token_batch(8)
  losses = {}
  for setting in ("threefry", "rbg"):
    config = ml_collections.ConfigDict(
        dict(seed=0, label_dropout=0.3, grad_accum_steps=1, dropout_rng=setting)
    )
    step = jax.jit(vim_step.make_train_step(model, None, tx, schedule, config))
    losses[setting] = [
        float(step(state.replace(step=jnp.int32(s)), batch, None)[1]["loss"]) for s in (0, 0, 1)
    ]
    first, again, next_step = losses[setting]
    assert first == again and first != next_step, (setting, losses[setting])
  assert losses["threefry"][0] != losses["rbg"][0], losses


def test_the_libtpu_flag_is_set_only_for_rbg_settings():
  from configs import quickstart, vim_base

  for setting, expected in (
      ("auto", True),
      ("rbg", True),
      ("unsafe_rbg", True),
      ("threefry", False),
  ):
    config = vim_base.get_config()
    config.dropout_rng = setting
    environ = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_latency_hiding_scheduler=true"}
    assert prng.configure_libtpu(config, environ) == expected
    flags = environ["LIBTPU_INIT_ARGS"].split()
    assert flags[0] == "--xla_tpu_enable_latency_hiding_scheduler=true"  # kept
    assert (prng.TPU_FLAG in flags) == expected, flags
    prng.configure_libtpu(config, environ)  # twice: named once
    assert environ["LIBTPU_INIT_ARGS"].count("rng_bit_generator") == int(expected)
  # A value given by hand stays; the quickstart's stages count, the classifier's config (no
  # dropout) does not.
  environ = {"LIBTPU_INIT_ARGS": "--xla_tpu_spmd_rng_bit_generator_unsafe=false"}
  assert prng.configure_libtpu(vim_base.get_config(), environ)
  assert environ["LIBTPU_INIT_ARGS"] == "--xla_tpu_spmd_rng_bit_generator_unsafe=false"
  config = quickstart.get_config()
  config.stage1.dropout_rng = config.stage2.dropout_rng = "threefry"
  assert not prng.configure_libtpu(config, {})
  config.stage2.dropout_rng = "rbg"
  assert prng.configure_libtpu(config, {})
  from configs import classifier

  assert not prng.configure_libtpu(classifier.get_config(), {})


def test_resume_is_exact_under_rbg_and_checkpoints_hold_no_key(tokenizer_dir, tmp_path):
  """A stage-2 run with rbg dropout (model dropout 0.1, label dropout 0.1) stopped after step 1
  and resumed equals the run that was not stopped, bit for bit. The state holds no PRNG key
  (the step's key is made from config.seed and the step), so the same checkpoint also resumes
  under threefry, whose masks differ."""
  config = tiny_vim_config(tokenizer_dir, steps=3)
  config.dropout_rng = "rbg"
  assert config.model.dropout > 0 and config.label_dropout > 0
  one = jax.devices()[:1]
  straight = vim_trainer.train_and_evaluate(config, str(tmp_path / "a"), devices=one)
  vim_trainer.train_and_evaluate(
      config, str(tmp_path / "b"), should_stop=lambda s: s == 1, devices=one
  )
  shutil.copytree(tmp_path / "b", tmp_path / "c")
  resumed = vim_trainer.train_and_evaluate(config, str(tmp_path / "b"), devices=one)
  assert [m["step"] for m in resumed.train_metrics] == [2, 3]
  assert_same_metrics(straight.train_metrics[1:], resumed.train_metrics, rel=0)
  assert_states_close(straight.state, resumed.state, rel=0.0)
  assert not [
      x
      for x in jax.tree.leaves(resumed.state)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  ]
  config.dropout_rng = "threefry"
  switched = vim_trainer.train_and_evaluate(config, str(tmp_path / "c"), devices=one)
  assert [m["step"] for m in switched.train_metrics] == [2, 3]
  assert switched.train_metrics[0]["loss"] != resumed.train_metrics[0]["loss"]


def test_the_stage1_train_step_draws_dropout_from_the_configs_prng(tiny_config):
  """Stage 1 (encoder dropout on) keys its dropout by config.dropout_rng: the traced step's
  random bits come from an rbg key under 'rbg' and from threefry's under 'threefry'."""
  from vim_jax.trainers import tokenizer_step

  tiny_config.model.encoder.dropout = 0.1
  tiny_config.loss.update(perceptual=0.0, adversarial=0.0)
  models = tokenizer_step.build_models(tiny_config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(tiny_config)
  init = tokenizer_step.make_init_fn(models, tx, disc_tx, tiny_config, init_batch=1)
  state = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))
  s = tiny_config.image_size
  batch = {"image": jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32)}
  for setting, key_type in (("rbg", "rbg"), ("threefry", "fry")):  # jaxpr's names of the keys
    tiny_config.dropout_rng = setting
    step = tokenizer_step.make_train_step(models, tx, schedule, disc_tx, tiny_config)
    text = str(jax.make_jaxpr(step)(state, batch, {}))
    assert "random_bits" in text, setting  # dropout is drawn
    assert set(re.findall(r"key<(\w+)>", text)) == {key_type}, setting
    assert set(re.findall(r"random_seed\[impl=(\w+)", text)) == {key_type}, setting


def test_a_compile_for_a_tpu_slice_draws_each_chips_masks_only():
  """The compile report sizes rbg dropout as main's runs have it: libtpu partitions the
  RngBitGenerator (tpu_slices names the flag), so on 4 data-parallel chips each draws the
  masks of its 16 of the 64 sequences, not the whole batch's (u32[64, ...] then sliced)."""
  from configs import vim_base
  from vim_jax.infra import tpu_slices
  from vim_jax.trainers import step_report

  config = vim_base.get_config("tiny")
  config.update(batch_size=64, dropout_rng="rbg")
  config.data.source = "tokens"
  devices = tpu_slices.compile_only_devices(tpu_slices.parse("v4-8"))
  assert prng.TPU_FLAG in os.environ["LIBTPU_INIT_ARGS"]
  hlo = step_report.report(config, devices, tokens_per_image=64, codebook_size=256)[
      "compiled"
  ].as_text()
  batches = {int(b) for b in re.findall(r"= u32\[(\d+),[\d,]*\]\{[^}]*\} rng-bit-generator\(", hlo)}
  assert batches == {16}, batches
