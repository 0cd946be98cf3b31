"""The factorized l2-normalized quantizer and the tokenizer's index round trip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax.models import quantizer as quantizer_lib
from vim_jax.models import vitvqgan


def _quantize(l2: bool, z: np.ndarray, k: int = 64):
  vq = quantizer_lib.VectorQuantizer(codebook_size=k, code_dim=z.shape[-1], l2_normalize=l2,
                                     beta=0.25)
  params = nn.meta.unbox(vq.init(jax.random.key(0), z))
  z_st, idx, aux = vq.apply(params, z)
  return vq, params, z_st, idx, aux


@pytest.mark.parametrize("l2", [True, False])
def test_outputs_are_codebook_rows_and_nearest(l2):
  z = np.random.default_rng(0).normal(size=(2, 10, 8)).astype(np.float32)
  vq, params, z_st, idx, aux = _quantize(l2, z)
  codebook = np.asarray(params["params"]["codebook"], np.float64)
  zz = z.astype(np.float64)
  if l2:
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    zz /= np.linalg.norm(zz, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z_st), axis=-1), 1.0, atol=1e-5)
  dists = ((zz[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(idx), dists.argmin(-1))
  np.testing.assert_allclose(np.asarray(z_st), codebook[np.asarray(idx)], atol=1e-5)
  # VQ loss: ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (means), both equal in value here.
  mse = np.mean((zz - codebook[np.asarray(idx)]) ** 2)
  np.testing.assert_allclose(float(aux["vq_loss"]), 1.25 * mse, rtol=1e-4)


def test_straight_through_gradient_reaches_the_normalized_latent():
  z = np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)
  vq, params, *_ = _quantize(True, z)
  target = np.random.default_rng(2).normal(size=z.shape).astype(np.float32)

  def downstream(z):  # a loss on the quantized output only
    z_st, _, _ = vq.apply(params, z)
    return jnp.sum(z_st * target)

  grad = np.asarray(jax.grad(downstream)(z))
  # Straight-through on the normalized latent: d/dz of sum(normalize(z) * target).
  expected = np.asarray(jax.grad(lambda z: jnp.sum(quantizer_lib.l2_normalize(z) * target))(z))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert np.abs(grad).sum() > 0


def test_codebook_statistics_closed_form():
  stats = quantizer_lib.codebook_statistics(jnp.array([0, 0, 1, 3]), codebook_size=8)
  np.testing.assert_array_equal(np.asarray(stats["counts"]), [2, 1, 0, 1, 0, 0, 0, 0])
  assert float(stats["codebook_usage"]) == pytest.approx(3 / 8)
  p = np.array([0.5, 0.25, 0.25])
  assert float(stats["perplexity"]) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
  uniform = quantizer_lib.codebook_statistics(jnp.arange(16) % 4, codebook_size=4)
  assert float(uniform["perplexity"]) == pytest.approx(4.0, rel=1e-6)


def test_gradients_reach_the_encoder(tiny_config):
  model = vitvqgan.ViTVQGAN.from_config(tiny_config)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), images))["params"]

  def loss(p):
    return jnp.mean(model.apply({"params": p}, images)["reconstruction"] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  enc_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["encoder"]))
  assert enc_norm > 0, "no gradient reached the encoder through the straight-through estimator"


def test_indices_round_trip_through_decode_from_indices(tiny_config):
  model = vitvqgan.ViTVQGAN.from_config(tiny_config)
  images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), images))
  out = jax.jit(model.apply)(params, images)
  indices = jax.jit(lambda p, x: model.apply(p, x, method=model.encode_to_indices))(params, images)
  assert indices.shape == (3, 8, 8) and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(out["indices"]))
  decoded = model.apply(params, indices, method=model.decode_from_indices)
  assert decoded.shape == (3, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(out["reconstruction"]), atol=1e-5)
  # Re-encoding the codes themselves is stable: indices -> codes -> same indices.
  vq = model.bind(params).quantizer
  np.testing.assert_array_equal(np.asarray(vq.lookup(vq.embed(indices))), np.asarray(indices))
