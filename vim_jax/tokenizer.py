"""Loading a trained stage-1 tokenizer (frozen) from its workdir, for stage 2 and evaluation."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections

from vim_jax import checkpoint, train_lib
from vim_jax.models import vitvqgan


@dataclasses.dataclass
class Tokenizer:
  model: vitvqgan.ViTVQGAN
  params: dict  # the tokenizer's params (the EMA copy when the run kept one)
  config: ml_collections.ConfigDict  # the stage-1 run's config
  step: int

  @property
  def grid(self) -> tuple[int, int]:
    return self.model.grid

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]


def load_tokenizer(workdir: str, step: int | None = None, shardings=None) -> Tokenizer:
  """Restores the tokenizer params of a stage-1 workdir (latest checkpoint by default).

  shardings: optional NamedSharding (one for all leaves) or a tree of them for the params;
  default: replicated on the first device.
  """
  from vim_jax import train_vitvq  # the stage-1 state layout lives with its trainer

  config = train_lib.read_run_config(workdir, "vitvq")
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints; train the tokenizer "
                            "first.")
  models = train_vitvq.build_models(config)
  tx, _, disc_tx = train_vitvq.build_optimizers(config)
  init = train_vitvq.make_init_fn(models, tx, disc_tx, config, init_batch=1)
  shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  sharding_tree = jax.tree.map(lambda _: shardings, shapes) if not isinstance(
      shardings, dict) else shardings
  try:
    state = ckpt.restore(step, checkpoint.abstract_with_shardings(shapes, sharding_tree))
  except Exception as e:
    raise ValueError(f"the checkpoint at {workdir} step {step} does not match the tokenizer "
                     f"its config.json describes: {e}") from e
  finally:
    ckpt.close()
  params = state.ema_params if state.ema_params is not None else state.params
  return Tokenizer(models.tokenizer, params, config, int(step))
