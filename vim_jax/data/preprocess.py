"""Per-example preprocessing: resize the shorter side, crop, flip (uint8, on the host); the
scaling to [-1, 1] happens on the device (from_uint8), so batches cross as uint8."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 with min(H, W) == size (bicubic, antialiased when shrinking)."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
  resized = Image.fromarray(image).resize((new_hw[1], new_hw[0]), Image.Resampling.BICUBIC)
  return np.asarray(resized)


def crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
  """Random crop when rng is given, else centre crop, to [size, size, 3]."""
  h, w = image.shape[:2]
  if rng is None:
    top, left = (h - size) // 2, (w - size) // 2
  else:
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
  return image[top : top + size, left : left + size]


def preprocess_image(
    image: np.ndarray, size: int, rng: np.random.Generator | None, random_flip: bool
) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3] (from_uint8 gives the model's input).

  Training (rng given): random crop and, if random_flip, a horizontal flip with p=0.5.
  Eval (rng None): centre crop, no flip.
  """
  image = crop(resize_shorter_side(image, size), size, rng)
  if rng is not None and random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


def from_uint8(images):
  """uint8 [0, 255] -> float32 in [-1, 1] (numpy or jax arrays): the models' input.

  An exact subtraction, then one rounded multiplication: numpy on the host and XLA on a device
  give the same bits (XLA would turn a division into this multiplication anyway), 0 and 255
  map to -1 and 1 exactly, and every value is within 7.5e-8 of x / 127.5 - 1.
  """
  return (images.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
