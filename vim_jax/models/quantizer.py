"""Factorized, l2-normalized vector quantizer (ViT-VQGAN, Sec. 3.2) and codebook statistics.

The encoder projects its output to a low-dimensional lookup space (code_dim, 32 in the paper);
there both the latent and the codebook are l2-normalized, so nearest-neighbour lookup is a
cosine-similarity argmax. The straight-through estimator is applied to the *normalized*
latent, so the gradient that reaches the encoder is the one of the vector that was looked up.
With `l2_normalize=False` the quantizer is the classic Euclidean VQ (the paper's ablation).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def codebook_statistics(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """Usage and perplexity of the codes in `indices` (any shape, int).

  Returns:
    counts: [K] how often each code was chosen.
    codebook_usage: fraction of the K codes chosen at least once.
    perplexity: exp(entropy) of the empirical code distribution (K when uniform).
  """
  flat = indices.reshape(-1)
  counts = jnp.zeros((codebook_size,), jnp.float32).at[flat].add(1.0)
  probs = counts / flat.shape[0]
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0))
  return {
      "counts": counts,
      "codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)),
      "perplexity": jnp.exp(entropy),
  }


class VectorQuantizer(nn.Module):
  """Nearest-code lookup with straight-through gradients.

  Attributes:
    codebook_size: number of codes K.
    code_dim: lookup dimension d.
    l2_normalize: cosine lookup on unit vectors (paper) instead of Euclidean.
    beta: commitment weight in ||sg[z] - e||^2 + beta ||z - sg[e]||^2.
  """

  codebook_size: int
  code_dim: int
  l2_normalize: bool = True
  beta: float = 0.25

  def setup(self):
    self.codebook = self.param(
        "codebook",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("codebook", "code_dim")),
        (self.codebook_size, self.code_dim),
    )

  def normalized_codebook(self) -> jax.Array:
    """[K, d] float32 codebook as used for lookup."""
    codebook = self.codebook.astype(jnp.float32)
    return l2_normalize(codebook) if self.l2_normalize else codebook

  def lookup(self, z: jax.Array) -> jax.Array:
    """z: [..., d] (already normalized when l2) -> int32 indices [...].

    The scores are float32 products at HIGHEST precision on every backend: at the default
    precision a TPU runs a float32 matmul as one bf16 pass (8 mantissa bits, ~4e-3 relative),
    and cosine similarities of nearby codes differ by less than that, so the argmax, and with it
    pretokenized data, would depend on the chip that made it. The lookup is d (32) wide, so the
    6-pass cost is small against the encoder; no gradient flows through the argmax, so the
    straight-through and VQ-loss paths are unchanged.
    """
    z = z.astype(jnp.float32)
    codebook = self.normalized_codebook()
    dot = jnp.einsum(
        "...d,kd->...k",
        z,
        codebook,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if self.l2_normalize:
      scores = dot
    else:  # argmin ||z - e||^2 == argmax (2 z.e - ||e||^2)
      scores = 2.0 * dot - jnp.sum(codebook**2, -1)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)

  def embed(self, indices: jax.Array) -> jax.Array:
    """int indices [...] -> codes [..., d] float32."""
    return jnp.take(self.normalized_codebook(), indices, axis=0)

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Quantizes z.

    Args:
      z: [B, N, d] encoder latents in the lookup space.

    Returns:
      z_st: [B, N, d] quantized codes carrying straight-through gradients to z.
      indices: [B, N] int32 code indices.
      aux: vq_loss (scalar), counts [K], codebook_usage, perplexity.
    """
    z = z.astype(jnp.float32)
    if self.l2_normalize:
      z = l2_normalize(z)
    indices = self.lookup(z)
    z_q = self.embed(indices)
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z_q))
    commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q)))
    z_st = z + jax.lax.stop_gradient(z_q - z)
    aux = {
        "vq_loss": codebook_loss + self.beta * commitment_loss,
        "codebook_loss": codebook_loss,
        "commitment_loss": commitment_loss,
        **codebook_statistics(indices, self.codebook_size),
    }
    return z_st, indices, aux
