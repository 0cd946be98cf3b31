"""Gradient accumulation and the lean VIM loss: k microbatches give one batch's update; the
chunked cross-entropy equals the full-logits one, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stacks
from run_compare import assert_states_close

from vim_jax.models import vim as vim_lib
from vim_jax.trainers import microbatch, tokenizer_step, vim_step


def test_microbatches_take_consecutive_examples_from_every_device_shard():
  batch = {"x": jnp.arange(8)}
  micro = microbatch.split(batch, k=2, data_parallel=2)["x"]  # shards [0..3], [4..7]
  np.testing.assert_array_equal(micro, [[0, 1, 4, 5], [2, 3, 6, 7]])
  np.testing.assert_array_equal(microbatch.split(batch, 4, 1)["x"], np.arange(8).reshape(4, 2))


def test_batch_that_does_not_split_is_a_clear_error(tiny_config):
  tiny_config.grad_accum_steps = 3
  with pytest.raises(ValueError, match="batch_size=16 must be a multiple of grad_accum_steps=3"):
    microbatch.check(tiny_config, data_parallel=2)


def _run(step_fn, state, batches, step_variant=None):
  """step_variant(i) -> the step function for step i (default: step_fn every step)."""
  steps = {}
  for i, batch in enumerate(batches):
    fn = step_variant(i) if step_variant else step_fn
    steps.setdefault(fn, jax.jit(fn))
    state, metrics = steps[fn](state, batch, {})
  return state, metrics


def test_stage1_accumulated_update_equals_one_large_batch(tiny_config):
  """GAN (with lazy R1 and LeCam) and EMA on: 2 microbatches of 4 give the state of one batch
  of 8 (two minibatch-stddev groups), over two steps (the second starts from params the first
  moved)."""
  tiny_config.update(ema_decay=0.9)
  tiny_config.discriminator.update(lecam_weight=0.1, r1_interval=2)
  models = tokenizer_step.build_models(tiny_config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(tiny_config)
  init = tokenizer_step.make_init_fn(models, tx, disc_tx, tiny_config, init_batch=1)
  state = nn.meta.unbox(jax.jit(init)(jax.random.key(0)))
  batches = [
      {"image": jax.random.uniform(jax.random.key(i), (8, 32, 32, 3), minval=-1, maxval=1)}
      for i in range(2)
  ]
  results = {}
  for k in (1, 2):
    tiny_config.grad_accum_steps = k
    variants = tokenizer_step.make_train_steps(models, tx, schedule, disc_tx, tiny_config)
    results[k] = _run(
        None, state, batches, lambda i: variants[tokenizer_step.is_r1_step(tiny_config, i)]
    )
  (one, m1), (two, m2) = results[1], results[2]
  for key in ("loss", "grad_norm", "disc/loss", "disc/grad_norm", "disc/r1_penalty"):
    assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-4), key
  assert int(two.step) == 2  # optimizer steps, not microbatches
  assert_states_close(one, two, param_atol=tiny_config.optimizer.peak_lr)  # see stage 2's


def _tiny_vim(**overrides):
  return stacks.vim(
      stack=stacks.stack(
          num_layers=2,
          width=32,
          num_heads=2,
          head_dim=16,
          mlp_dim=64,
          causal=True,
          scan_layers=True,
      ),
      vocab_size=64,
      num_tokens=16,
      num_classes=3,
      **overrides,
  )


def test_vim_step_accumulated_update_equals_one_large_batch():
  from configs import vim_base

  config = vim_base.get_config("tiny")
  config.model.dropout = 0.0
  model = _tiny_vim()
  tx, schedule = vim_step.build_optimizer(config)
  params = nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), jnp.zeros((1,), jnp.int32))
  )["params"]
  state = vim_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  rng = np.random.default_rng(0)
  batches = [
      {
          "tokens": jnp.asarray(rng.integers(0, 64, (16, 16)), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 3, (16,)), jnp.int32),
      }
      for _ in range(2)
  ]
  results = {}
  for k in (1, 4):
    config.grad_accum_steps = k
    results[k] = _run(vim_step.make_train_step(model, None, tx, schedule, config), state, batches)
  (one, m1), (four, m4) = results[1], results[4]
  for key in ("loss", "accuracy", "grad_norm"):
    assert float(m4[key]) == pytest.approx(float(m1[key]), rel=1e-5), key
  # The attention key bias's true gradient is 0 (softmax ignores a per-query constant) and
  # Adam turns its float noise into steps of up to lr: params get that slack, the moments none.
  assert_states_close(one, four, param_atol=config.optimizer.peak_lr)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_vim_loss_equals_full_logits_cross_entropy(dtype):
  """VIM.loss (4 chunks of 4 tokens, logits recomputed per chunk for the gradient) equals the
  cross-entropy of the full [B, N, V] logits: values and every gradient."""
  model = _tiny_vim(loss_chunk=4, dtype=jnp.dtype(dtype))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (3, 16)), jnp.int32)
  labels = jnp.array([0, 2, 1])
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens, labels))["params"]

  def reference(p):
    logits = model.apply({"params": p}, tokens, labels)  # [B, N, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0].mean(-1)
    return jnp.mean(nll), (nll, (jnp.argmax(logits, -1) == tokens).mean(-1))

  def chunked(p):
    nll, accuracy = model.apply({"params": p}, tokens, labels, method=vim_lib.VIM.loss)
    return jnp.mean(nll), (nll, accuracy)

  (value_r, (nll_r, acc_r)), grads_r = jax.value_and_grad(reference, has_aux=True)(params)
  (value_c, (nll_c, acc_c)), grads_c = jax.value_and_grad(chunked, has_aux=True)(params)
  np.testing.assert_allclose(nll_c, nll_r, rtol=1e-5)
  np.testing.assert_allclose(acc_c, acc_r)
  # bfloat16 backward passes round their products in a different order: 2^-8 relative.
  rtol = 1e-4 if dtype == "float32" else 2e-2
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_r))
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * 0.1 * largest)
  with pytest.raises(ValueError, match="loss_chunk=5 does not divide the 16 tokens"):
    _tiny_vim(loss_chunk=5).apply({"params": params}, tokens, labels, method=vim_lib.VIM.loss)
