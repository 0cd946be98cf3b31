"""A small convolutional image classifier, for rejection sampling and sample accuracy on data
without a pretrained classifier (the embedded dataset). Images [B, S, S, 3] in [-1, 1]."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvClassifier(nn.Module):
  """Stages of two 3x3 conv + GroupNorm + ReLU, 2x2 max pooling between stages, global
  average pooling and a linear head. `widths` sets the channels per stage. GroupNorm (not
  BatchNorm) keeps the model a pure function of its params."""

  num_classes: int
  widths: tuple[int, ...] = (32, 64, 128)

  @classmethod
  def from_config(cls, config, num_classes: int) -> "ConvClassifier":
    """From a classifier config's `model` section and the dataset's class count."""
    return cls(num_classes, tuple(config.model.widths))

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] -> logits [B, num_classes] float32."""
    x = images.astype(jnp.float32)
    for i, width in enumerate(self.widths):
      if i:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for part in "ab":
        x = nn.Conv(width, (3, 3), name=f"conv{i}{part}")(x)
        x = nn.relu(nn.GroupNorm(num_groups=8, name=f"norm{i}{part}")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)
