"""Gradient accumulation: one optimizer step from k microbatches of a global batch.

`config.grad_accum_steps = k` splits each global batch of B examples into k microbatches of
B/k and averages what the step computes on each (gradients, losses, metrics) before the one
optimizer update, so the update equals that of a single batch of B (every loss here is a mean
over examples) with 1/k of the activations in memory. Two things are computed per microbatch
and averaged, so they shift with k: stage 1's adaptive adversarial weight (when on) and the
codebook usage / perplexity metrics. The learning-rate schedule and the logged step count
optimizer steps.

Each microbatch takes B/(k * dp) consecutive examples from every data-parallel device's shard,
so no example moves between devices and consecutive examples stay together (the
discriminator's minibatch-stddev groups are consecutive examples).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vim_jax.infra import parallel


def check(config, data_parallel: int):
  """The batch must split into grad_accum_steps microbatches with whole shards per device."""
  k = config.grad_accum_steps
  if k < 1 or config.batch_size % (k * data_parallel):
    raise ValueError(
        f"config.batch_size={config.batch_size} must be a multiple of grad_accum_steps={k} x "
        f"the data-parallel size {data_parallel}; change one of them (grad_accum_steps >= 1)."
    )


def split(batch, k: int, data_parallel: int):
  """A pytree of [B, ...] arrays -> [k, B/k, ...]: microbatch i holds examples
  [i*m, (i+1)*m) of every device's shard of B/dp (m = B / (k*dp))."""

  def one(x):
    b = x.shape[0]
    m = b // (k * data_parallel)
    x = x.reshape(data_parallel, k, m, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape(k, data_parallel * m, *x.shape[3:])
    if not jax.sharding.get_abstract_mesh().empty:
      x = jax.lax.with_sharding_constraint(x, P(None, parallel.BATCH_AXES))
    return x

  return jax.tree.map(one, batch)


def mean_over_microbatches(fn: Callable, batch, k: int, data_parallel: int):
  """The mean over k microbatches of fn(microbatch, index) (a pytree of float arrays).

  k = 1 is fn(batch, 0). Otherwise the microbatches run one after the other under lax.scan,
  so only one microbatch's activations are alive at a time; sums are carried in float32.
  """
  if k == 1:
    return fn(batch, jnp.zeros((), jnp.int32))
  micro = split(batch, k, data_parallel)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(fn, first, jnp.zeros((), jnp.int32))
  zeros = jax.tree.map(
      lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes
  )

  def body(total, xs):
    out = fn(*xs)
    return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

  total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k, dtype=jnp.int32)))
  return jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, shapes)
