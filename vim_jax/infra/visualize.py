"""Image grids for TensorBoard and PNG files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vim_jax.data import preprocess
from vim_jax.infra import fileio


def pairs_grid(
    images: np.ndarray, reconstructions: np.ndarray, columns: int = 4, padding: int = 2
) -> np.ndarray:
  """Inputs next to their reconstructions.

  Args:
    images, reconstructions: [N, H, W, 3] in [-1, 1].
  Returns:
    uint8 [rows*(H+p)+p, columns*(2W+p)+p, 3]; each cell is (input | reconstruction).
  """
  pairs = np.concatenate(
      [preprocess.to_uint8(images), preprocess.to_uint8(reconstructions)], axis=2
  )
  return tile(pairs, columns, padding)


def tile(images: np.ndarray, columns: int, padding: int = 2, fill: int = 255) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 grid image with `columns` columns."""
  n, h, w, c = images.shape
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  grid = np.full(
      (rows * (h + padding) + padding, columns * (w + padding) + padding, c), fill, np.uint8
  )
  for i in range(n):
    r, col = divmod(i, columns)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def save_png(image: np.ndarray, path: str, min_size: int = 256):
  """Writes uint8 [H, W, 3]; small grids are upscaled (nearest) so they are viewable."""
  scale = max(1, -(-min_size // max(1, min(image.shape[:2]))))
  if scale > 1:
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  fileio.write_bytes(path, buffer.getvalue())
