"""VIM-Base: class-conditional ImageNet 256 generation on a ViT-VQGAN tokenizer (stage 2).

  python -m vim_jax.main --config=configs/vim_base.py --workdir=$WORKDIR \
      --config.tokenizer_workdir=$STAGE1_WORKDIR
  python -m vim_jax.main --config=configs/vim_base.py:tiny --workdir=/tmp/vim_tiny \
      --config.tokenizer_workdir=/tmp/bb_tiny  # CPU smoke, on a :tiny stage-1 run

Paper: 24 blocks, width 1536 (650M params), Adam (0.9, 0.96), 5k warmup to 4.5e-4, exponential
decay to 1e-5 from step 80k, batch 1024, 450k steps. Linear probe: block 10 of 24, 65.1%
ImageNet top-1 (reported for the unconditional model: --config.model.num_classes=0).
"""

from vim_jax import config_base


def get_config(arg=None):
  variants = config_base.parse_variant(arg, allowed=("tiny",))
  config = config_base.stage2_config("base")
  return config_base.make_tiny_stage2(config) if "tiny" in variants else config
