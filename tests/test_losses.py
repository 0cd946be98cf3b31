"""Losses and image metrics against independent float64 numpy / TensorFlow references."""

import numpy as np
import pytest
import tensorflow as tf

from vim_jax.evaluators import image_metrics
from vim_jax.trainers import losses


def _images(seed, shape=(2, 16, 16, 3)):
  return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def test_l2_and_l1_match_numpy():
  a, b = _images(0), _images(1)
  d = a.astype(np.float64) - b
  # float32 means of 1,536 terms: XLA's CPU reduction order (which the suite's compile flags
  # change, tests/conftest.py) moves them by up to ~1e-6.
  assert float(losses.l2_loss(a, b)) == pytest.approx(np.mean(d**2), rel=1e-5)
  assert float(losses.l1_loss(a, b)) == pytest.approx(np.mean(np.abs(d)), rel=1e-5)


def _logit_laplace_reference(mu, log_b, target, eps):
  """-log p(x), p(x) = exp(-|logit x - mu| / b) / (2 b x (1 - x)), in float64."""
  x = eps + (1 - 2 * eps) * (target.astype(np.float64) + 1) / 2
  b = np.exp(log_b.astype(np.float64))
  density = np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b) / (2 * b * x * (1 - x))
  return np.mean(-np.log(density))


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_logit_laplace_nll_matches_density(eps):
  rng = np.random.default_rng(3)
  mu = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  log_b = rng.uniform(-1, 0.5, size=mu.shape).astype(np.float32)
  target = _images(4, mu.shape)
  ours = float(losses.logit_laplace_nll(mu, log_b, target, eps))
  assert ours == pytest.approx(_logit_laplace_reference(mu, log_b, target, eps), rel=1e-5)


def test_logit_laplace_density_integrates_to_one():
  """A true density on (0, 1): integrate exp(-nll) numerically for one pixel."""
  x01 = np.linspace(1e-6, 1 - 1e-6, 400_001)
  eps = 0.0
  target = (x01 * 2 - 1).reshape(-1, 1, 1, 1).astype(np.float64)
  y = np.log(x01 / (1 - x01))
  mu, log_b = 0.3, -0.5
  nll = np.abs(y - mu) / np.exp(log_b) + log_b + np.log(2) + np.log(x01) + np.log1p(-x01)
  assert np.trapezoid(np.exp(-nll), x01) == pytest.approx(1.0, abs=2e-3)
  ours = float(
      losses.logit_laplace_nll(
          np.full(target.shape[:1] + (1, 1, 1), mu),
          np.full(target.shape[:1] + (1, 1, 1), log_b),
          target.astype(np.float32),
          eps,
      )
  )
  assert ours == pytest.approx(np.mean(nll), rel=1e-3)


def test_weighted_total_and_missing_weight():
  terms = {"l2": 2.0, "vq": 3.0}
  assert losses.weighted_total(terms, {"l2": 1.0, "vq": 0.5, "unused": 9}) == 3.5
  with pytest.raises(KeyError, match="vq"):
    losses.weighted_total(terms, {"l2": 1.0})


def test_psnr_closed_form():
  a = np.zeros((1, 8, 8, 3), np.float32)
  b = np.full_like(a, 0.2)  # in [0, 1]: a difference of 0.1 -> MSE 0.01 -> 20 dB
  assert float(image_metrics.psnr(a, b)[0]) == pytest.approx(20.0, abs=1e-4)


def test_ssim_matches_tensorflow():
  a, b = _images(5, (3, 32, 32, 3)), _images(6, (3, 32, 32, 3))
  b = np.clip(a + 0.2 * b, -1, 1)
  ours = np.asarray(image_metrics.ssim(a, b))
  ref = tf.image.ssim(
      tf.constant((a + 1) / 2),
      tf.constant((b + 1) / 2),
      max_val=1.0,
      filter_size=11,
      filter_sigma=1.5,
      k1=0.01,
      k2=0.03,
  ).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(image_metrics.ssim(a, a)), 1.0, atol=1e-5)


def test_adaptive_adversarial_weight_is_a_gradient_norm_ratio():
  import jax.numpy as jnp

  rec = {"a": jnp.full((2, 2), 3.0), "b": jnp.full((4,), 4.0)}  # norm sqrt(4*9 + 4*16) = 10
  adv = {"a": jnp.full((2, 2), 0.5), "b": jnp.zeros((4,))}  # norm 1
  assert float(losses.adaptive_adversarial_weight(rec, adv)) == pytest.approx(10 / (1 + 1e-4))
  zero = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((4,))}
  assert float(losses.adaptive_adversarial_weight(rec, zero)) == 1e4  # clipped, not inf
