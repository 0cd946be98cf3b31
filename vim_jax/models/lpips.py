"""LPIPS v0.1 (Zhang et al. 2018) on VGG16, in Flax: a perceptual loss and an eval metric.

distance(x, y) for images in [-1, 1]:
  1. scale:  (x - shift) / scale per RGB channel, shift (-.030, -.088, -.188),
     scale (.458, .448, .450);
  2. VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
  3. each feature map divided by its channel-wise l2 norm (+1e-10) at every position;
  4. squared difference, a 1x1 linear head per layer without bias (the learned v0.1 weights),
     spatial mean;
  5. sum over the five layers.

Weights come from the two published PyTorch files, converted once by
`python -m vim_jax.tools.convert_lpips` (see that module); the network is frozen: callers pass
its params as a constant so no gradient reaches them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import serialization

from vim_jax.infra import fileio

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# VGG16 "features" as (torchvision index of the conv, output channels); "M" = 2x2 max pool.
VGG16_LAYOUT = (
    (0, 64),
    (2, 64),
    "M",
    (5, 128),
    (7, 128),
    "M",
    (10, 256),
    (12, 256),
    (14, 256),
    "M",
    (17, 512),
    (19, 512),
    (21, 512),
    "M",
    (24, 512),
    (26, 512),
    (28, 512),
)
# The conv whose ReLU output is tapped: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPPED_CONVS = (2, 7, 14, 21, 28)
TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
  """VGG16 conv stack; returns the five tapped ReLU outputs, each [B, H_l, W_l, C_l]."""

  dtype: jnp.dtype = jnp.float32
  precision: str | None = None  # jax.lax.Precision of the convs; None = the backend's default

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for layer in VGG16_LAYOUT:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        continue
      index, channels = layer
      x = nn.Conv(
          channels,
          (3, 3),
          padding=((1, 1), (1, 1)),
          dtype=self.dtype,
          precision=self.precision,
          name=f"conv{index}",
      )(x)
      x = nn.relu(x)
      if index in TAPPED_CONVS:
        taps.append(x)
      if index == TAPPED_CONVS[-1]:
        break
    return taps


def normalize_channels(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """Perceptual distance; __call__(x, y) with [B, H, W, 3] in [-1, 1] returns [B].

  The trainers build it in float32 whatever the tokenizer's dtype (a bf16 VGG moves the
  distance by more than 1e-3), and evaluation also asks for `precision='highest'`: TPUs run a
  float32 conv at the default precision as one bfloat16 pass."""

  dtype: jnp.dtype = jnp.float32
  precision: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    # x and y go through the same VGG one after the other: concatenating them along the
    # batch axis would move examples between the devices that share the batch.
    vgg = VGG16Features(self.dtype, self.precision, name="vgg")
    features = lambda images: vgg(((images.astype(jnp.float32) - shift) / scale).astype(self.dtype))
    total = 0.0
    for k, (fx, fy, channels) in enumerate(zip(features(x), features(y), TAP_CHANNELS)):
      fx = normalize_channels(fx.astype(jnp.float32))
      fy = normalize_channels(fy.astype(jnp.float32))
      weight = self.param(f"lin{k}", nn.initializers.ones_init(), (channels,))
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", jnp.square(fx - fy), weight), axis=(1, 2))
    return total


MISSING_WEIGHTS_HELP = """\
LPIPS weights not found at {path!r} (config.loss.perceptual > 0 needs them).
Make them once from the two published PyTorch files:
  1. torchvision's VGG16 ImageNet weights, vgg16-397923af.pth
     (python -c "import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')"
      saves it under ~/.cache/torch/hub/checkpoints/), and
  2. the lpips package's weights/v0.1/vgg.pth (pip install lpips; it is inside the package);
then run
  pip install '.[convert]'
  python -m vim_jax.tools.convert_lpips --vgg16=/path/to/vgg16-397923af.pth \\
      --lpips_head=/path/to/lpips/weights/v0.1/vgg.pth --output={path}
or point --config.perceptual_weights at an existing converted file."""


def load_params(path: str):
  """Converted LPIPS params (a .msgpack written by convert_lpips), or a clear error."""
  if not fileio.exists(path):
    raise FileNotFoundError(MISSING_WEIGHTS_HELP.format(path=path))
  return serialization.msgpack_restore(fileio.read_bytes(path))
