"""Converts the published PyTorch LPIPS (v0.1, VGG16) weights to one Flax params file.

  pip install '.[convert]'      # torch, only for reading .pth files
  python -m vim_jax.tools.convert_lpips \
      --vgg16=vgg16-397923af.pth \
      --lpips_head=lpips/weights/v0.1/vgg.pth \
      --output=weights/lpips_vgg16_v0.1.msgpack

Inputs, in their own layouts:
  --vgg16       torchvision's VGG16 state_dict: features.{i}.weight [out, in, 3, 3] and
                features.{i}.bias [out] for the convs i in 0..28 (classifier.* is ignored).
  --lpips_head  the lpips package's v0.1 linear heads: lin{k}.model.1.weight [1, C_k, 1, 1].
Output: a flax msgpack of {'params': {'vgg': {'conv{i}': {'kernel': [3, 3, in, out],
'bias': [out]}}, 'lin{k}': [C_k]}} for vim_jax.models.lpips.LPIPS.
"""

from __future__ import annotations

import argparse

import numpy as np

from vim_jax.models import lpips
from vim_jax.tools import weights_io


def convert(vgg16_state: dict[str, np.ndarray], head_state: dict[str, np.ndarray]) -> dict:
  """Flax LPIPS params from the two state dicts (numpy arrays, published key layouts)."""
  vgg = {}
  for layer in lpips.VGG16_LAYOUT:
    if layer == "M":
      continue
    index, channels = layer
    if index > lpips.TAPPED_CONVS[-1]:
      break
    key = f"features.{index}"
    if f"{key}.weight" not in vgg16_state:
      raise KeyError(
          f"{key}.weight missing from the VGG16 file; expected torchvision's "
          "vgg16 state_dict (keys features.0.weight ... features.28.bias)."
      )
    weight = vgg16_state[f"{key}.weight"]
    if weight.shape[0] != channels or weight.shape[2:] != (3, 3):
      raise ValueError(f"{key}.weight has shape {weight.shape}; expected ({channels}, in, 3, 3).")
    vgg[f"conv{index}"] = {
        "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
        "bias": vgg16_state[f"{key}.bias"],
    }
  params = {"vgg": vgg}
  for k, channels in enumerate(lpips.TAP_CHANNELS):
    key = f"lin{k}.model.1.weight"
    if key not in head_state:
      raise KeyError(
          f"{key} missing from the LPIPS head file; expected the lpips package's "
          "weights/v0.1/vgg.pth (keys lin0.model.1.weight ... lin4.model.1.weight)."
      )
    weight = head_state[key]
    if weight.shape != (1, channels, 1, 1):
      raise ValueError(f"{key} has shape {weight.shape}; expected (1, {channels}, 1, 1).")
    params[f"lin{k}"] = weight.reshape(channels)
  return {"params": params}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vgg16", required=True, help="torchvision vgg16 state_dict (.pth)")
  parser.add_argument("--lpips_head", required=True, help="lpips weights/v0.1/vgg.pth")
  parser.add_argument("--output", required=True, help="Flax params file to write (.msgpack)")
  args = parser.parse_args(argv)
  params = convert(
      weights_io.load_state_dict(args.vgg16), weights_io.load_state_dict(args.lpips_head)
  )
  weights_io.save_params(params, args.output)
  n = sum(np.size(x) for x in _leaves(params))
  print(f"wrote {args.output}: {n:,} parameters")


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == "__main__":
  main()
