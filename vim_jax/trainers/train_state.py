"""The one train state every trainer checkpoints, and how a run gets it: restored from its
latest checkpoint, else initialised, sharded by the config's logical axis rules."""

from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
from clu import parameter_overview

from vim_jax.infra import checkpoint, parallel

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """A model's params and optimizer state at a step. The tokenizer's GAN fields are None when
  unused, and always for VIM and the classifier; None holds no leaves, so a checkpoint holds
  exactly the fields a run uses."""

  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any = None  # discriminator, when loss.adversarial > 0
  disc_opt_state: Any = None
  ema_params: Any = None  # EMA of the tokenizer params, when ema_decay > 0 (used for eval)
  lecam_ema: Any = None  # {'real', 'fake'} EMAs of D's logits, when LeCam is on


def create_or_restore_state(init_fn, seed: int, mesh, rules, ckpt):
  """The sharded train state: restored from ckpt's latest step, else freshly initialised.

  init_fn(rng) returns a state whose params carry logical-axis boxes. Returns
  (state, state_shardings, abstract_state, latest_step_or_None).
  """
  with parallel.tracing_context(mesh, rules):
    boxed_shapes = jax.eval_shape(init_fn, jax.random.key(seed))
  shardings = parallel.logical_shardings(boxed_shapes, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed_shapes), shardings)
  state, latest = ckpt.restore_latest(abstract)
  if state is None:
    with parallel.tracing_context(mesh, rules):
      state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(
          jax.random.key(seed)
      )
  log.info("%s at step %d", "starting" if latest is None else "resumed", int(state.step))
  return state, shardings, abstract, latest


def log_parameter_overview(params) -> None:
  """clu's table of parameter shapes, with each one's mean and std when this process can read
  every value (a tensor-parallel group across hosts holds parts of some arrays elsewhere)."""
  readable = all(
      x.is_fully_addressable for x in jax.tree.leaves(params) if isinstance(x, jax.Array)
  )
  parameter_overview.log_parameter_overview(params, include_stats=readable)
