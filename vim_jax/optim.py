"""Optimizers and learning-rate schedules built from a config's `optimizer` section."""

from __future__ import annotations

import jax
import optax


def warmup_cosine_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to peak_lr, then cosine decay to end_lr at total_steps."""
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.peak_lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_config.end_lr)


def decay_matrices_only(params):
  """Weight decay on kernels and embeddings (ndim >= 2), not on biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(opt_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping then Adam with decoupled weight decay."""
  chain = []
  if opt_config.grad_clip_norm and opt_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                           weight_decay=opt_config.weight_decay, mask=decay_matrices_only))
  return optax.chain(*chain)


def warmup_exponential_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """VIM's schedule: linear warmup to peak_lr, constant until decay_start, then exponential
  decay reaching end_lr at total_steps."""
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  decay_start = min(max(opt_config.decay_start, warmup), max(total_steps - 1, 0))
  warm = optax.linear_schedule(0.0, opt_config.peak_lr, max(warmup, 1))
  decay = optax.exponential_decay(
      opt_config.peak_lr, transition_steps=max(total_steps - decay_start, 1),
      decay_rate=opt_config.end_lr / opt_config.peak_lr, transition_begin=decay_start - warmup,
      end_value=opt_config.end_lr)
  return optax.join_schedules([warm, decay], [warmup])
