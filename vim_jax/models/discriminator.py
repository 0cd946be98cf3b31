"""StyleGAN2-style discriminator (Karras et al. 2020, residual architecture), in Flax.

fromRGB (1x1 conv) at full resolution, then residual blocks that halve the resolution with a
[1, 3, 3, 1] blur before every strided conv, down to 4x4; minibatch standard deviation; a 3x3
conv, a dense layer and a dense logit. Width at resolution r is
min(max_channels, channel_base // r), so the network scales with config.image_size.
Images [B, H, W, 3] in [-1, 1] -> logits [B].
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LRELU_SLOPE = 0.2


def lrelu(x: jax.Array) -> jax.Array:
  """Leaky ReLU with StyleGAN's sqrt(2) gain, which keeps activations at unit variance."""
  return nn.leaky_relu(x, LRELU_SLOPE) * math.sqrt(2.0)


# Weights of variance 1 / fan_in. The activation already carries StyleGAN's sqrt(2) gain, so a
# conv followed by lrelu keeps unit variance, as StyleGAN2's unit-variance weights scaled by
# 1 / sqrt(fan_in) at run time do. He init (2 / fan_in) on top of that gain doubled the variance
# at every layer: at 256 px the initial logits reached |mean| ~ 100 and the game started
# saturated. (No equalized learning rate: the optimizer steps the weights at their run-time
# scale, as in the rest of the model.)
weight_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def blur(x: jax.Array) -> jax.Array:
  """Depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 low-pass filter; [B, H, W, C], same size."""
  k1 = np.array([1.0, 3.0, 3.0, 1.0])
  k = np.outer(k1, k1)
  k /= k.sum()
  c = x.shape[-1]
  kernel = jnp.tile(jnp.asarray(k, x.dtype)[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (1, 1),
      ((1, 2), (1, 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
  )


def conv(
    features: int, kernel: int, stride: int = 1, use_bias: bool = True, name=None, dtype=jnp.float32
) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=use_bias,
      dtype=dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(weight_init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
  )


class DiscriminatorBlock(nn.Module):
  """Residual block: two 3x3 convs (the second strided after a blur) + blurred 1x1 skip."""

  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, H/2, W/2, out_channels]."""
    y = lrelu(conv(x.shape[-1], 3, name="conv0", dtype=self.dtype)(x))
    y = lrelu(conv(self.out_channels, 3, stride=2, name="conv1", dtype=self.dtype)(blur(y)))
    skip = conv(self.out_channels, 1, stride=2, use_bias=False, name="skip", dtype=self.dtype)(
        blur(x)
    )
    return (y + skip) / math.sqrt(2.0)


def minibatch_stddev(x: jax.Array, group_size: int = 4) -> jax.Array:
  """Appends the per-group standard deviation, averaged over features, as one channel.

  Groups of `group_size` consecutive examples (the whole batch if smaller); [B, H, W, C] ->
  [B, H, W, C + 1]. Consecutive, unlike StyleGAN2's strided groups (examples i, i + B/g, ...):
  with the batch split over devices, a group then lies on one device (when each device's share
  is a multiple of g) and no example has to travel.
  """
  b, h, w, c = x.shape
  g = min(group_size, b)
  while b % g:
    g -= 1
  y = x.reshape(b // g, g, h, w, c).astype(jnp.promote_types(x.dtype, jnp.float32))
  std = jnp.sqrt(jnp.var(y, axis=1) + 1e-8)  # [B/g, H, W, C]
  feature = jnp.mean(std, axis=(1, 2, 3))  # [B/g]
  feature = jnp.broadcast_to(feature[:, None, None, None, None], (b // g, g, h, w, 1))
  feature = feature.reshape(b, h, w, 1)
  return jnp.concatenate([x, feature.astype(x.dtype)], axis=-1)


class StyleGANDiscriminator(nn.Module):
  image_size: int
  channel_base: int = 16384
  max_channels: int = 512
  mbstd_group_size: int = 4
  dtype: jnp.dtype = jnp.float32

  def channels(self, resolution: int) -> int:
    return max(1, min(self.max_channels, self.channel_base // resolution))

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] in [-1, 1] -> logits [B] (float32, or float64 for a float64 net)."""
    size = self.image_size
    if images.shape[1:3] != (size, size) or size < 8 or size & (size - 1):
      raise ValueError(
          f"discriminator built for {size}x{size} (a power of two >= 8), got "
          f"images of shape {images.shape}."
      )
    x = lrelu(
        conv(self.channels(size), 1, name="from_rgb", dtype=self.dtype)(images.astype(self.dtype))
    )
    resolution = size
    while resolution > 4:
      x = DiscriminatorBlock(
          self.channels(resolution // 2), self.dtype, name=f"block_{resolution}"
      )(x)
      resolution //= 2
    x = minibatch_stddev(x, self.mbstd_group_size)
    x = lrelu(conv(self.channels(4), 3, name="conv_4x4", dtype=self.dtype)(x))
    x = x.reshape(x.shape[0], -1)
    dense = lambda n, name: nn.Dense(
        n,
        dtype=self.dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(weight_init, ("conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    )
    x = lrelu(dense(self.channels(4), "fc")(x))
    return dense(1, "logit")(x)[:, 0].astype(jnp.promote_types(self.dtype, jnp.float32))
