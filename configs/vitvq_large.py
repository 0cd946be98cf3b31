"""ViT-VQGAN Small-Large (SL): small encoder, large decoder, on ImageNet 256x256.

  python -m vim_jax.main --config=configs/vitvq_large.py --workdir=$WORKDIR
  python -m vim_jax.main --config=configs/vitvq_large.py:noperceptual ...  # for linear probes
  python -m vim_jax.main --config=configs/vitvq_large.py:tiny --workdir=/tmp/sl_tiny  # CPU smoke

Paper: encoder Small (8 blocks, width 512), decoder Large (32 blocks, width 1280, 16 heads of
64, MLP 5120; 599M params reported), codebook 8192 x 32, 384 img/s on 128 TPUv4 cores,
rFID 1.28 on ImageNet validation with the full objective. The large
decoder rematerialises its blocks to fit activations at batch 256.
"""

from vim_jax import config_base


def get_config(arg=None):
  variants = config_base.parse_variant(arg)
  config = config_base.stage1_config("small", "large")
  config.model.decoder.remat_policy = "full"
  return config_base.apply_stage1_variants(config, variants)
