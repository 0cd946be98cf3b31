"""Transformer stacks and VIMs the tests build by hand: the sizes a test needs, with the
configs' options (configs/common.py and configs/vim_base.py, the one place they have defaults),
unrolled and in float32 unless a test asks otherwise."""

import jax.numpy as jnp

from configs import common, vim_base
from vim_jax.models import transformer
from vim_jax.models import vim as vim_lib


def stack(**fields) -> transformer.StackConfig:
  options = {**common.stack_kernels(), **common.block_options(), "dropout": 0.0}
  return transformer.StackConfig(**{**options, "scan_layers": False, **fields})


def vim(cls=vim_lib.VIM, **fields) -> vim_lib.VIM:
  model = vim_base.get_config().model
  options = dict(
      num_classes=0,
      condition_every_position=model.condition_every_position,
      loss_chunk=model.loss_chunk,
      dtype=jnp.float32,
  )
  return cls(**{**options, **fields})
