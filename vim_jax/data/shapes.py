"""The embedded dataset: coloured geometric shapes, generated in code (no download).

Each example is a pure function of (seed, split, index, style): a background and one
anti-aliased shape of a random colour, position, size and rotation. The label is the shape's
class; classes are balanced (label = index % num_classes). Any resolution.

The style (ShapesStyle) sets how varied the images are: the default has two-colour gradient
backgrounds and any RGB colour; a palette of a few colours and solid backgrounds make a
low-entropy variant that a small generator can learn in minutes (the quickstart's).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

CLASS_NAMES = ("disk", "square", "triangle", "ring", "cross", "crescent")


def _box_sdf(x, y, half_w, half_h):
  """Signed distance to an axis-aligned box (negative inside)."""
  dx, dy = np.abs(x) - half_w, np.abs(y) - half_h
  outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
  return outside + np.minimum(np.maximum(dx, dy), 0)


def _shape_sdf(name: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
  """Signed distance (in image-width units) to a shape of radius r centred at 0."""
  if name == "disk":
    return np.hypot(x, y) - r
  if name == "ring":
    return np.abs(np.hypot(x, y) - 0.75 * r) - 0.25 * r
  if name == "square":
    return _box_sdf(x, y, 0.8 * r, 0.8 * r)
  if name == "crescent":  # a disk minus a shifted disk
    return np.maximum(np.hypot(x, y) - r, -(np.hypot(x - 0.45 * r, y) - 0.8 * r))
  if name == "cross":
    return np.minimum(_box_sdf(x, y, r, 0.3 * r), _box_sdf(x, y, 0.3 * r, r))
  if name == "triangle":  # intersection of three half-planes
    angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    d = [x * np.cos(a) + y * np.sin(a) for a in angles]
    return np.max(np.stack(d), axis=0) - 0.5 * r
  raise ValueError(f"unknown shape {name!r}; expected one of {CLASS_NAMES}")


# The palette of the low-entropy style: well separated, saturated colours.
PALETTE = np.array(
    [
        [0.9, 0.1, 0.1],
        [0.1, 0.7, 0.2],
        [0.15, 0.3, 0.9],
        [0.95, 0.8, 0.1],
        [0.6, 0.2, 0.8],
        [0.1, 0.8, 0.85],
        [0.95, 0.5, 0.1],
        [0.95, 0.95, 0.95],
        [0.1, 0.1, 0.1],
        [0.9, 0.4, 0.7],
        [0.5, 0.35, 0.2],
        [0.5, 0.5, 0.5],
    ]
)


@dataclasses.dataclass(frozen=True)
class ShapesStyle:
  num_colors: int = 0  # 0: any RGB colour; k: the first k PALETTE colours
  gradient: bool = True  # two-colour gradient background (else a solid one)
  min_radius: float = 0.15  # shape radius range, in image widths
  max_radius: float = 0.28


def _colour(rng: np.random.Generator, style: ShapesStyle) -> np.ndarray:
  if style.num_colors:
    return PALETTE[rng.integers(0, style.num_colors)]
  return rng.uniform(0, 1, 3)


def _distinct_colour(rng: np.random.Generator, avoid: np.ndarray, style: ShapesStyle):
  for _ in range(100):
    colour = _colour(rng, style)
    if np.abs(colour - avoid).sum() > 0.6:
      return colour
  return 1.0 - avoid


def render_example(
    seed: int,
    split: str,
    index: int,
    resolution: int,
    num_classes: int = len(CLASS_NAMES),
    style: ShapesStyle = ShapesStyle(),
) -> tuple[np.ndarray, int]:
  """One example: (image uint8 [resolution, resolution, 3], label int)."""
  if not 1 <= num_classes <= len(CLASS_NAMES):
    raise ValueError(f"num_classes={num_classes}; the shapes dataset has 1..{len(CLASS_NAMES)}.")
  if not 0 <= style.num_colors <= len(PALETTE) or style.num_colors == 1:
    raise ValueError(
        f"shapes num_colors={style.num_colors}; expected 0 (any colour) or 2..{len(PALETTE)}."
    )
  label = index % num_classes
  rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
  coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
  yy, xx = np.meshgrid(coords, coords, indexing="ij")

  bg_a = _colour(rng, style)
  bg_b = _colour(rng, style) if style.gradient else bg_a
  direction = rng.uniform(0, 2 * np.pi)
  t = np.clip(0.5 + (xx - 0.5) * np.cos(direction) + (yy - 0.5) * np.sin(direction), 0, 1)
  background = bg_a + (bg_b - bg_a) * t[..., None]

  fg = _distinct_colour(rng, (bg_a + bg_b) / 2, style)
  cx, cy = rng.uniform(0.3, 0.7, 2)
  r = rng.uniform(style.min_radius, style.max_radius)
  theta = rng.uniform(0, 2 * np.pi)
  x, y = xx - cx, yy - cy
  xr, yr = x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)
  sdf = _shape_sdf(CLASS_NAMES[label], xr, yr, r)
  coverage = np.clip(0.5 - sdf * resolution, 0.0, 1.0)[..., None]  # 1-pixel anti-aliasing
  image = background * (1 - coverage) + fg * coverage
  return np.round(image * 255).astype(np.uint8), label
