"""VIM-Large: class-conditional ImageNet 256 generation on a ViT-VQGAN tokenizer (stage 2).

  python -m vim_jax.main --config=configs/vim_large.py --workdir=$WORKDIR \
      --config.tokenizer_workdir=$STAGE1_WORKDIR --config.mesh.fsdp=-1 --config.mesh.tensor=4
  python -m vim_jax.main --config=configs/vim_large.py:tiny --workdir=/tmp/vim_tiny \
      --config.tokenizer_workdir=/tmp/bb_tiny  # CPU smoke

Paper: 36 blocks, width 2048 (1697M params). With ViT-VQGAN SL: FID 4.17 / IS 175.1 on
ImageNet 256 class-conditional; 3.04 / 227.4 with ResNet-101 rejection sampling at acceptance
0.5. Linear probe: block 15 of 36, 73.2% ImageNet top-1 (unconditional model).
"""

from vim_jax import config_base


def get_config(arg=None):
  variants = config_base.parse_variant(arg, allowed=("tiny",))
  config = config_base.stage2_config("large")
  return config_base.make_tiny_stage2(config) if "tiny" in variants else config
