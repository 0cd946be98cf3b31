"""ViT-VQGAN Small-Small (SS) on ImageNet 256x256: the paper's stage-1 recipe.

  python -m vim_jax.main --config=configs/vitvq_small.py --workdir=$WORKDIR
  python -m vim_jax.main --config=configs/vitvq_small.py:noperceptual ...  # for linear probes
  python -m vim_jax.main --config=configs/vitvq_small.py:tiny --workdir=/tmp/ss_tiny  # CPU smoke

Paper: 8 blocks, 8 heads, width 512, MLP 2048 (32M params per stack, reported), codebook
8192 x 32, 1520 img/s on 128 TPUv4 cores, rFID 1.99 on ImageNet validation
with the full objective.
"""

from vim_jax import config_base


def get_config(arg=None):
  variants = config_base.parse_variant(arg)
  config = config_base.stage1_config("small", "small")
  return config_base.apply_stage1_variants(config, variants)
