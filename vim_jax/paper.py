"""The paper's published numbers (Yu et al., ICLR 2022; ../shared/PAPER.md), for the tools and
tests that compare against them. Config files state their own values; this module only says
what the paper reports.

Marks as in PAPER.md: [paper] stated in the paper, [paper?] reported by secondary summaries.
"""

from __future__ import annotations

# Table 1 (stage 1) [paper]: blocks, heads, model dim, MLP dim. Heads are 64 wide, so Large's
# attention width is 16 x 64 = 1024 while its model width is 1280.
VIT_SIZES = {
    "small": dict(num_layers=8, width=512, num_heads=8, head_dim=64, mlp_dim=2048),
    "base": dict(num_layers=12, width=768, num_heads=12, head_dim=64, mlp_dim=3072),
    "large": dict(num_layers=32, width=1280, num_heads=16, head_dim=64, mlp_dim=5120),
}

# Reported parameter counts [paper?]; they match one stack (encoder or decoder) each.
PARAMS_PER_STACK = {"small": 32e6, "base": 91e6, "large": 599e6}

# Stage-1 training throughput on 128 TPUv4 cores (a v4-128), images/s [paper, Table 2], by
# (encoder, decoder) size at 256 px and batch 256.
STAGE1_THROUGHPUT = {("small", "small"): 1520, ("base", "base"): 960, ("small", "large"): 384}

# rFID of the reconstructed validation images against the validation images, 256 px
# [paper, Table 2; paper? for the two face datasets].
RFID = {
    "imagenet": {("small", "small"): 1.99, ("base", "base"): 1.55, ("small", "large"): 1.28},
    "celeb_a_hq": 4.66,
    "ffhq": 3.13,
}

# Stage 2 [paper?]: blocks and widths; heads and MLP dims unverified (the configs use 96-wide
# heads for Base, 64-wide for Large, MLP = 4 x width).
VIM_SIZES = {
    "base": dict(num_layers=24, width=1536, num_heads=16, head_dim=96, mlp_dim=6144),
    "large": dict(num_layers=36, width=2048, num_heads=32, head_dim=64, mlp_dim=8192),
}
VIM_PARAMS = {"base": 650e6, "large": 1697e6}

# The block whose sequence-mean features the linear probe reads, and its ImageNet top-1
# [paper for Large; paper? for Base].
PROBE_BLOCK = {"base": 10, "large": 15}
PROBE_TOP1 = {"base": 0.651, "large": 0.732}

# ImageNet 256 class-conditional, ViT-VQGAN + VIM-Large [paper]: without and with ResNet-101
# rejection sampling at acceptance 0.5.
CLASS_CONDITIONAL = {"fid": 4.17, "is": 175.1, "fid_rejection": 3.04, "is_rejection": 227.4}

# Unconditional FID at 256 px [paper?].
UNCONDITIONAL_FID = {"celeb_a_hq": 7.0, "ffhq": 5.3}


def vit_size_of(stack) -> str | None:
  """The Table-1 size name a stack config (a mapping with VIT_SIZES' keys) has the shape of;
  None if none."""
  for name, shape in VIT_SIZES.items():
    if all(stack.get(k) == v for k, v in shape.items()):
      return name
  return None
