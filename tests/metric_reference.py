"""The reported metrics computed here in float64 numpy / scipy from their definitions, as
pytorch-fid and the improved-GAN Inception Score code compute them, independently of
vim_jax.evaluators.fid's streaming moments and eigenvalue route."""

import warnings

import numpy as np
import scipy.linalg


def frechet_distance(pool_a: np.ndarray, pool_b: np.ndarray) -> float:
  """FID between two feature sets [N, D]: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)),
  with unbiased covariances (pytorch-fid's np.cov)."""
  a, b = np.asarray(pool_a, np.float64), np.asarray(pool_b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():  # the tests' few images give singular covariances
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean))


def inception_score(probabilities: np.ndarray, splits: int = 10) -> float:
  """exp(E_x KL(p(y|x) || p(y))) averaged over consecutive splits (fewer images than splits:
  one image per split)."""
  p = np.asarray(probabilities, np.float64)
  splits = min(splits, len(p))
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(0)
    kl = np.sum(part * (np.log(part + 1e-30) - np.log(marginal + 1e-30)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))
