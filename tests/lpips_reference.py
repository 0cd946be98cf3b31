"""Random LPIPS weights in the published layouts: torchvision's vgg16 state_dict and the lpips
package's v0.1 linear heads, written with torch for the converter to read."""

import os

import torch

from vim_jax.models import lpips

VGG_CONVS = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
]


def make_published_files(directory, seed=0):
  """Random weights in torchvision's vgg16 layout and the lpips package's v0.1 head layout."""
  g = torch.Generator().manual_seed(seed)
  vgg = {}
  for i, cin, cout in VGG_CONVS:
    vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
    vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
  vgg["classifier.0.weight"] = torch.zeros(4, 8)  # present in the real file, ignored
  head = {
      f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
      for k, c in enumerate(lpips.TAP_CHANNELS)
  }
  vgg_path, head_path = os.path.join(directory, "vgg16.pth"), os.path.join(directory, "vgg.pth")
  torch.save(vgg, vgg_path)
  torch.save(head, head_path)
  return vgg, head, vgg_path, head_path
