"""Converts pytorch-fid's FID InceptionV3 weights to one Flax params file.

  pip install '.[convert]'      # torch, only for reading .pth files
  python -m vim_jax.tools.convert_inception \
      --pth=pt_inception-2015-12-05-6726825d.pth \
      --output=weights/pt_inception-2015-12-05.msgpack

Input, in its own layout (torchvision Inception3 names, 1008 classes, no AuxLogits):
  {block}.conv.weight [out, in, kh, kw], {block}.bn.{weight,bias,running_mean,running_var}
  [out] (and num_batches_tracked, ignored) for every BasicConv2d, e.g.
  Conv2d_1a_3x3.conv.weight or Mixed_7c.branch3x3dbl_3a.bn.running_var; fc.weight [1008, 2048],
  fc.bias [1008].
Output: a flax msgpack of {'params': ...} for vim_jax.models.inception.InceptionV3FID, each
torch key renamed (Mixed_5b.branch1x1.conv.weight -> Mixed_5b/branch1x1/conv/kernel, transposed
to [kh, kw, in, out]). Every expected tensor must be present with its shape; extra tensors
(other than num_batches_tracked) are an error, so a wrong file cannot convert silently.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vim_jax.models import inception
from vim_jax.tools import weights_io

# torch suffix -> (flax leaf path suffix, transform)
_BN = {
    "bn.weight": "bn/scale",
    "bn.bias": "bn/bias",
    "bn.running_mean": "bn/mean",
    "bn.running_var": "bn/var",
}


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """'Mixed_5b/branch1x1/conv/kernel' -> shape, from the Flax model itself."""
  shapes = jax.eval_shape(
      inception.InceptionV3FID().init,
      jax.random.key(0),
      jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)),
  )
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def flax_name(torch_key: str) -> tuple[str, bool]:
  """(Flax param path, whether the tensor is a conv or dense weight to transpose)."""
  if torch_key == "fc.weight":
    return "fc/kernel", True
  if torch_key == "fc.bias":
    return "fc/bias", False
  block, _, suffix = torch_key.partition(".conv.")
  if suffix == "weight":
    return block.replace(".", "/") + "/conv/kernel", True
  for torch_suffix, flax_suffix in _BN.items():
    if torch_key.endswith("." + torch_suffix):
      block = torch_key[: -len(torch_suffix) - 1]
      return block.replace(".", "/") + "/" + flax_suffix, False
  raise KeyError(
      f"unexpected tensor {torch_key!r} in the Inception file; expected "
      "pytorch-fid's pt_inception-2015-12-05 state_dict (BasicConv2d conv/bn "
      "tensors and fc.weight/fc.bias)."
  )


def convert(state: dict[str, np.ndarray]) -> dict:
  """Flax InceptionV3FID params from pytorch-fid's state_dict (numpy arrays)."""
  expected = expected_shapes()
  flat = {}
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue
    if key.startswith("AuxLogits."):
      raise KeyError(
          f"{key!r}: this file has torchvision's auxiliary head, so it is not the "
          "FID network; use pytorch-fid's pt_inception-2015-12-05-6726825d.pth."
      )
    name, transpose = flax_name(key)
    if name not in expected:
      raise KeyError(f"{key!r} (as {name}) is not a tensor of the FID InceptionV3.")
    value = np.asarray(value, np.float32)
    if transpose:
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if value.shape != expected[name]:
      raise ValueError(
          f"{key!r} has shape {value.shape} after conversion; expected "
          f"{expected[name]}. Is this the 1008-class FID network?"
      )
    flat[name] = np.ascontiguousarray(value)
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise KeyError(
        f"{len(missing)} tensors missing from the Inception file, e.g. "
        f"{missing[:3]}; expected pytorch-fid's pt_inception-2015-12-05 file."
    )
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  parser.add_argument("--output", required=True, help="Flax params file to write (.msgpack)")
  args = parser.parse_args(argv)
  params = convert(weights_io.load_state_dict(args.pth))
  weights_io.save_params(params, args.output)
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  print(f"wrote {args.output}: {n:,} values")


if __name__ == "__main__":
  main()
