"""FID / IS arithmetic against closed forms and scipy, statistics files, streaming extraction."""

import logging

import numpy as np
import pytest
import scipy.linalg

from vim_jax.evaluators import fid


def _random_cov(rng, dim, rank=None):
  a = rng.normal(size=(dim, rank or dim))
  return a @ a.T / (rank or dim)


def test_frechet_distance_closed_form_for_commuting_covariances():
  # Diagonal covariances commute: FID = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-12)
  # Same covariance, shifted mean: only the mean term remains.
  s = _random_cov(rng, 16)
  assert fid.frechet_distance(mu1, s, mu2, s) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_on_general_covariances():
  rng = np.random.default_rng(1)
  s1, s2 = _random_cov(rng, 64), _random_cov(rng, 64)
  mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real  # pytorch-fid's way
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_even_when_covariance_is_singular():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(100, 256)) * 10  # fewer images than dimensions: rank 99
  moments = fid.RunningMoments(256)
  moments.update(features)
  stats = moments.stats()
  assert np.linalg.matrix_rank(stats.sigma) < 256
  assert fid.fid_from_stats(stats, stats) < 1e-6


def test_frechet_distance_rejects_mismatched_or_broken_statistics():
  with pytest.raises(ValueError, match="differ in size"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="non-finite"):
    fid.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_negative_eigenvalues_warn_like_imaginary_parts(caplog):
  bad = np.diag([1.0, -1.0])  # not PSD: its "square root" is imaginary
  with caplog.at_level(logging.WARNING):
    fid.trace_sqrt_product(np.eye(2), bad)
  assert "imaginary part" in caplog.text


def test_running_moments_equal_numpy_over_uneven_batches():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(103, 8)) * 5 + 100  # a large mean tests the merge's stability
  moments = fid.RunningMoments(8)
  for start, stop in ((0, 1), (1, 40), (40, 41), (41, 103)):
    moments.update(features[start:stop])
  stats = moments.stats("x")
  assert stats.num_images == 103
  np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)


def test_inception_score_closed_forms():
  n, k = 1000, 10
  uniform = np.full((n, 1008), 1 / 1008)
  mean, std = fid.inception_score(uniform)
  assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  # Confident (one-hot) predictions spread evenly over k classes in every split: IS = k.
  confident = np.zeros((n, 1008))
  confident[np.arange(n), np.arange(n) % k] = 1.0
  mean, std = fid.inception_score(confident, splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="needs >= 10"):
    fid.inception_score(uniform[:5])


def _inception_score_reference(probabilities, splits):
  """improved-GAN's IS in float64, written out: for each of `splits` consecutive equal parts,
  exp(mean over its images of KL(p(y|x) || p_part(y))), p_part the part's own marginal; then
  the mean and (population) std of those scores."""
  p = np.asarray(probabilities, np.float64)
  n = len(p)
  scores = []
  for i in range(splits):
    part = p[i * n // splits : (i + 1) * n // splits]
    marginal = part.mean(axis=0)
    kl = [sum(q * np.log(q / m) for q, m in zip(row, marginal) if q > 0) for row in part]
    scores.append(np.exp(np.mean(kl)))
  return np.mean(scores), np.std(scores)


def test_inception_score_uses_each_splits_own_marginal_and_exp_of_the_mean_kl():
  """Splits whose marginals differ, so that a global marginal, or mean(exp KL) for
  exp(mean KL), gives another value. Closed form: 10 confident images over 5 classes (score 5)
  then 10 uniform ones (score 1): mean 3, std 2. Then Dirichlet rows of a different sharpness and
  support per split, against the float64 reference."""
  k = 12
  confident = np.zeros((10, k))
  confident[np.arange(10), np.arange(10) % 5] = 1.0
  probs = np.concatenate([confident, np.full((10, k), 1 / k)])
  mean, std = fid.inception_score(probs, splits=2)
  assert mean == pytest.approx(3.0, rel=1e-9) and std == pytest.approx(2.0, rel=1e-9)

  rng = np.random.default_rng(8)
  parts = [
      rng.dirichlet(np.full(k, 0.3), size=16),  # sharp, all classes
      rng.dirichlet(np.full(k, 3.0), size=16),  # flat
      np.pad(rng.dirichlet(np.full(4, 0.5), size=16), ((0, 0), (0, k - 4))),
  ]  # 4 classes
  probs = np.concatenate(parts)
  expected = _inception_score_reference(probs, splits=3)
  mean, std = fid.inception_score(probs, splits=3)
  assert mean == pytest.approx(expected[0], rel=1e-9) and std == pytest.approx(
      expected[1], rel=1e-9
  )

  # The wrong variants differ from it by more than any rounding.
  def kl(part, marginal):
    ratio = np.divide(part, marginal, out=np.ones_like(part), where=part > 0)
    return np.sum(part * np.log(ratio), axis=1)

  global_marginal = np.mean([np.exp(kl(q, probs.mean(0)).mean()) for q in parts])
  mean_of_exp = np.mean([np.exp(kl(q, q.mean(0))).mean() for q in parts])
  print(
      f"\nIS {mean:.4f} +- {std:.4f}; with a global marginal {global_marginal:.4f}; "
      f"mean(exp KL) {mean_of_exp:.4f}"
  )
  assert min(abs(global_marginal - mean), abs(mean_of_exp - mean)) > 1e-2 * mean


def test_statistics_files_round_trip_and_read_adm_reference_batches(tmp_path):
  rng = np.random.default_rng(4)
  stats = fid.FeatureStats(rng.normal(size=4), _random_cov(rng, 4), 77, "shapes eval split")
  path = str(tmp_path / "stats.npz")
  stats.save(path)
  back = fid.FeatureStats.load(path)
  np.testing.assert_array_equal(back.mu, stats.mu)
  np.testing.assert_array_equal(back.sigma, stats.sigma)
  assert (back.num_images, back.description) == (77, "shapes eval split")
  # ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 (images), mu, sigma, and spatial stats.
  adm = str(tmp_path / "VIRTUAL_ref.npz")
  np.savez(
      adm,
      arr_0=np.zeros((2, 8, 8, 3), np.uint8),
      mu=stats.mu.astype(np.float32),
      sigma=stats.sigma,
      mu_s=np.zeros(3),
      sigma_s=np.eye(3),
  )
  ref = fid.FeatureStats.load(adm)
  assert ref.num_images == 0 and ref.description == "VIRTUAL_ref.npz"
  assert fid.fid_from_stats(ref, stats) < 1e-6
  np.savez(str(tmp_path / "wrong.npz"), features=np.zeros(3))
  with pytest.raises(KeyError, match="expected 'mu' and 'sigma'"):
    fid.FeatureStats.load(str(tmp_path / "wrong.npz"))


def test_extractor_streams_uneven_batches_exactly(inception_files):
  """Sharded over 8 devices, any batch sizes: same statistics as one pass, exact count."""
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=8)
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
  pool, probs = extractor(images[:8])
  streamed = extractor.extract([images[:5], images[5:6], images[6:]], "random images")
  assert streamed.num_images == 13 and streamed.probabilities.shape == (13, 1008)
  np.testing.assert_allclose(streamed.probabilities[:8], probs, rtol=1e-5, atol=1e-7)
  rest, _ = extractor(images[8:])
  full = np.concatenate([pool, rest]).astype(np.float64)
  np.testing.assert_allclose(streamed.stats.mu, full.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(streamed.stats.sigma, np.cov(full, rowvar=False), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="expected uint8"):
    extractor(images.astype(np.float32))


def test_inception_score_probabilities_leave_out_the_fc_bias(inception_files):
  """IS is softmax(pool @ W) as improved-GAN's code, the ADM evaluator and torch-fidelity compute
  it; the converted file's fc bias is non-zero, so softmax(pool @ W + b) would differ."""
  import torch

  state = torch.load(inception_files["pth"], weights_only=True)
  weight = state["fc.weight"].double().numpy()  # [1008, 2048], torch's (out, in) layout
  bias = state["fc.bias"].double().numpy()
  assert np.abs(bias).max() > 0.05
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=8)
  images = np.random.default_rng(7).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  pool, probs = extractor(images)

  def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  expected = softmax(pool.astype(np.float64) @ weight.T)
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)
  biased = softmax(pool.astype(np.float64) @ weight.T + bias)
  assert np.abs(biased - expected).max() > 100 * np.abs(probs - expected).max()
  print(
      f"\nIS of 8 random images: {fid.inception_score(probs, splits=1)[0]:.6f} (unbiased "
      f"logits), {fid.inception_score(biased, splits=1)[0]:.6f} (with the fc bias); max "
      f"|p - p_biased| {np.abs(biased - expected).max():.2e}, max |p - numpy| "
      f"{np.abs(probs - expected).max():.2e}"
  )
