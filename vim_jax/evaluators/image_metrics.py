"""Reconstruction quality metrics on image batches: PSNR and SSIM (jax.numpy, jit-friendly).

Inputs are [B, H, W, C] in [-1, 1]; both metrics are computed on [0, 1] per image and returned
per image ([B]), so that callers can mask padded examples and average exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_unit_range(images: jax.Array) -> jax.Array:
  return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
  """Per-image PSNR in dB with data range 1: [B, H, W, C] x2 -> [B]."""
  mse = jnp.mean(jnp.square(to_unit_range(images) - to_unit_range(reconstructions)), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(coords**2) / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def ssim(
    images: jax.Array,
    reconstructions: jax.Array,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004) with a Gaussian window, 'valid' filtering (as
  tf.image.ssim), averaged over positions and channels: [B, H, W, C] x2 -> [B].

  The window shrinks to the image size for images smaller than window_size.
  """
  x, y = to_unit_range(images), to_unit_range(reconstructions)
  size = min(window_size, x.shape[1], x.shape[2])
  g = jnp.asarray(_gaussian_window(size, sigma))
  c = x.shape[-1]

  def blur(z):  # separable depthwise Gaussian, valid padding
    kh = jnp.tile(g.reshape(size, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(g.reshape(1, size, 1, 1), (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    z = jax.lax.conv_general_dilated(
        z, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c
    )
    return jax.lax.conv_general_dilated(
        z, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c
    )

  c1, c2 = k1**2, k2**2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x**2
  var_y = blur(y * y) - mu_y**2
  cov = blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
      (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  )
  return jnp.mean(ssim_map, axis=(1, 2, 3))
