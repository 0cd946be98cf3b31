"""ViT-VQGAN Base-Base (BB) on ImageNet 256x256: the paper's main tokenizer.

  python -m vim_jax.main --config=configs/vitvq_base.py --workdir=$WORKDIR
  python -m vim_jax.main --config=configs/vitvq_base.py:noperceptual ...  # for linear probes
  python -m vim_jax.main --config=configs/vitvq_base.py:tiny --workdir=/tmp/bb_tiny  # CPU smoke

Paper: 12 blocks, 12 heads, width 768, MLP 3072 (91M params per stack, reported), codebook
8192 x 32 l2-normalized (96% usage), 960 img/s on 128 TPUv4 cores, rFID 1.55 on ImageNet
validation with the full objective (L2, logit-Laplace, LPIPS, StyleGAN adversarial, VQ).
"""

from vim_jax import config_base


def get_config(arg=None):
  variants = config_base.parse_variant(arg)
  config = config_base.stage1_config("base", "base")
  return config_base.apply_stage1_variants(config, variants)
