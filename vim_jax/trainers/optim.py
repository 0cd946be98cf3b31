"""Optimizers and learning-rate schedules built from a config's `optimizer` section."""

from __future__ import annotations

import jax
import optax


def warmup_cosine_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to peak_lr, then cosine decay to end_lr at total_steps."""
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt_config.peak_lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=opt_config.end_lr,
  )


def is_decayed_weight(path) -> bool:
  """Whether the parameter at this tree path gets weight decay: the dense and conv kernels
  (`kernel`, and the attention's `query_kernel`, ..., `out_kernel`) and the token and class
  embedding tables (nn.Embed's `embedding`). Not the biases (the attention's are 2-D,
  [heads, head_dim]), LayerNorm and GroupNorm scales, position embeddings or the codebook,
  whose pull toward 0 is not a prior on a weight. By name rather than by ndim: a scanned
  stack's LayerNorm scale is [layers, width]."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  name = next((k for k in reversed(keys) if isinstance(k, str) and k != "value"), "")
  return name == "kernel" or name.endswith("_kernel") or name == "embedding"


def decay_weights_only(params):
  """The weight-decay mask of a parameter tree: True on the leaves `is_decayed_weight` names."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed_weight(path), params)


def adamw(opt_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping then Adam with decoupled weight decay."""
  chain = []
  if opt_config.grad_clip_norm and opt_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  chain.append(
      optax.adamw(
          schedule,
          b1=opt_config.b1,
          b2=opt_config.b2,
          eps=opt_config.eps,
          weight_decay=opt_config.weight_decay,
          mask=decay_weights_only,
      )
  )
  return optax.chain(*chain)


def warmup_exponential_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """VIM's schedule: linear warmup to peak_lr, constant until decay_start, then exponential
  decay reaching end_lr at total_steps."""
  warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
  decay_start = min(max(opt_config.decay_start, warmup), max(total_steps - 1, 0))
  warm = optax.linear_schedule(0.0, opt_config.peak_lr, max(warmup, 1))
  decay = optax.exponential_decay(
      opt_config.peak_lr,
      transition_steps=max(total_steps - decay_start, 1),
      decay_rate=opt_config.end_lr / opt_config.peak_lr,
      transition_begin=decay_start - warmup,
      end_value=opt_config.end_lr,
  )
  return optax.join_schedules([warm, decay], [warmup])
