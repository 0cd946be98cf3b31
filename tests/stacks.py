"""Transformer stacks the tests build by hand: the sizes a test needs, with the configs' kernel
and block options (configs/common.py, the one place they have defaults), unrolled unless a test
asks for scan_layers."""

from configs import common
from vim_jax.models import transformer


def stack(**fields) -> transformer.StackConfig:
  options = {**common.stack_kernels(), **common.block_options(), "dropout": 0.0}
  return transformer.StackConfig(**{**options, "scan_layers": False, **fields})
