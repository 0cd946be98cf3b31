"""The public ViT-VQGAN Small ImageNet 256 tokenizer of thuanz123/enhancing-transformers.

Describes their released model exactly (configs/imagenet_vitvq_small.yaml there) with our
model's options; see config_base.enhancing_stage1_config for what differs from the paper's
ViT-VQGAN. Download their checkpoint, imagenet_vitvq_small.ckpt (a PyTorch Lightning
file, MIT licence), from the link in their README (Google Drive id
1jbjD4q0iJpXrRMVSYJRIvM_94AxA1EqJ), then:

  pip install '.[convert]'   # torch, to read the file
  python -m vim_jax.tools.import_enhancing --ckpt=imagenet_vitvq_small.ckpt \
    --config=configs/enhancing_vitvq_small.py --workdir=workdirs/enhancing_small
  python -m vim_jax.evaluate --workdir=workdirs/enhancing_small   # rFID, IS, PSNR, SSIM, usage
  python -m vim_jax.main --config=configs/vim_base.py \
    --config.tokenizer_workdir=workdirs/enhancing_small --workdir=workdirs/vim_on_small

The workdir is a stage-1 run at the checkpoint's step; everything that takes a tokenizer
workdir accepts it. Variant :tiny is the tests' layout (64 px, the widths scaled down).
"""

from vim_jax import config_base


def get_config(arg=None):
  variants = config_base.parse_variant(arg, allowed=("tiny",))
  config = config_base.enhancing_stage1_config("small")
  return config_base.make_enhancing_tiny(config) if "tiny" in variants else config
