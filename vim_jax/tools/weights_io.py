"""Reading published PyTorch state_dicts and writing converted Flax params files."""

from __future__ import annotations

import io

import numpy as np
from flax import serialization

from vim_jax.infra import fileio


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state_dict as float32 numpy arrays (needs torch: the optional convert extra)."""
  try:
    import torch  # lazy: optional (the convert extra), and slow to import
  except ImportError as e:
    raise SystemExit("reading .pth files needs torch: pip install '.[convert]'") from e
  if not fileio.exists(path):
    raise FileNotFoundError(f"no such weights file: {path!r}")
  state = torch.load(io.BytesIO(fileio.read_bytes(path)), map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  return {k: v.detach().float().numpy() for k, v in state.items()}


def save_params(params: dict, path: str):
  """Writes a flax msgpack atomically: never a half-written weights file."""
  fileio.write_bytes(path, serialization.msgpack_serialize(params))
