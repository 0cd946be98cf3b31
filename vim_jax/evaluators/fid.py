"""FID and Inception Score, computed the standard way.

- Features: the 2048-d pool features and 1008 logits of the FID InceptionV3
  (vim_jax.models.inception), on uint8 images scaled to [0, 1] (as from saved PNGs).
- FID (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, with
  the unbiased covariance (np.cov's), as pytorch-fid.
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over 10 equal splits, mean and std,
  with the softmax over all 1008 unbiased logits, pool @ W without the fc bias (as improved-GAN's
  TF code, the ADM evaluator and torch-fidelity's `logits_unbiased`).
- Statistics files: .npz with 'mu' [2048] and 'sigma' [2048, 2048], the ADM reference-batch
  format (so gFID against their ImageNet train statistics works), plus our 'num_images' and
  'description' when we wrote them.

`FeatureExtractor` runs Inception sharded over the mesh and streams: it keeps running moments
(float64) and per-image class probabilities, never all the features.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.infra import fileio, parallel, progress_log
from vim_jax.models import inception

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FeatureStats:
  """Gaussian statistics of Inception pool features."""

  mu: np.ndarray  # [D] float64
  sigma: np.ndarray  # [D, D] float64, unbiased
  num_images: int = 0  # 0 = unknown (e.g. a reference file from elsewhere)
  description: str = ""  # what the statistics are of, e.g. "shapes eval split"

  def save(self, path: str):
    fileio.save_npz(
        path,
        mu=self.mu,
        sigma=self.sigma,
        num_images=np.asarray(self.num_images),
        description=np.asarray(self.description),
    )

  @classmethod
  def load(cls, path: str) -> FeatureStats:
    """Reads our files and ADM's reference batches (keys 'mu' and 'sigma'; other keys, such as
    the images in 'arr_0', are ignored)."""
    if not fileio.exists(path):
      raise FileNotFoundError(
          f"no statistics file at {path!r}; write one with "
          "`python -m vim_jax.evaluate ... --save_reference_stats=PATH`."
      )
    f = fileio.load_npz(path)
    if "mu" not in f or "sigma" not in f:
      raise KeyError(
          f"{path!r} has keys {sorted(f.keys())}; expected 'mu' and 'sigma' "
          "(our files, or ADM's VIRTUAL_*.npz reference batches)."
      )
    mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    num = int(f["num_images"]) if "num_images" in f else 0
    desc = str(f["description"]) if "description" in f else os.path.basename(path)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(
          f"{path!r}: mu {mu.shape} and sigma {sigma.shape} do not match; expected "
          "[D] and [D, D]."
      )
    return cls(mu, sigma, num, desc)


class RunningMoments:
  """Mean and unbiased covariance of feature batches, merged in float64 (Chan et al.), so
  50k x 2048 features never sit in memory at once."""

  def __init__(self, dim: int):
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.m2 = np.zeros((dim, dim), np.float64)  # sum of centred outer products

  def update(self, features: np.ndarray):
    x = np.asarray(features, np.float64)
    n = x.shape[0]
    if n == 0:
      return
    batch_mean = x.mean(0)
    centred = x - batch_mean
    delta = batch_mean - self.mean
    total = self.count + n
    self.m2 += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
    self.mean += delta * (n / total)
    self.count = total

  def stats(self, description: str = "") -> FeatureStats:
    if self.count < 2:
      raise ValueError(f"statistics need at least 2 images, got {self.count}.")
    return FeatureStats(self.mean.copy(), self.m2 / (self.count - 1), self.count, description)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, robust to singular covariances.

  S1 S2 is similar to the symmetric PSD A = S1^(1/2) S2 S1^(1/2), so the trace is
  sum_i sqrt(lambda_i(A)); both square roots come from symmetric eigendecompositions, which
  stay accurate when there are fewer images than dimensions (rank-deficient covariances),
  where scipy's sqrtm of the non-symmetric product can fail. Negative eigenvalues are
  rounding noise; their square roots are the "imaginary part" that pytorch-fid warns about,
  and so do we when it is not negligible.
  """
  w1, v1 = np.linalg.eigh(sigma1)
  root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
  a = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((a + a.T) / 2)
  real = float(np.sum(np.sqrt(np.clip(eig, 0, None))))
  imaginary = float(np.sum(np.sqrt(np.clip(-eig, 0, None))))
  if imaginary > 1e-3 * max(real, 1.0):
    log.warning(
        "FID: tr sqrt(S1 S2) has an imaginary part of %.3g against a real part of "
        "%.3g (negative eigenvalues down to %.3g); the covariances may not be PSD.",
        imaginary,
        real,
        eig.min(),
    )
  return real


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
        f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma "
        f"{sigma1.shape} vs {sigma2.shape}."
    )
  for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} has non-finite values; the features are broken.")
  diff = mu1 - mu2
  distance = (
      diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  )
  return float(max(distance, 0.0))  # exact arithmetic gives >= 0; clip rounding below it


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal, consecutive splits of p(y|x) [N, K] (rows sum to 1)."""
  p = np.asarray(probabilities, np.float64)
  if p.shape[0] < splits:
    raise ValueError(
        f"inception_score with {splits} splits needs >= {splits} images, got {p.shape[0]}."
    )
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(0, keepdims=True)
    log_ratio = np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None))
    kl = np.sum(part * log_ratio, axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Feature extraction.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Features:
  """What one streaming pass leaves: the FID statistics and the IS probabilities."""

  stats: FeatureStats
  probabilities: np.ndarray  # [N, 1008] float32 softmax of the unbiased logits (pool @ W)

  @property
  def num_images(self) -> int:
    return self.stats.num_images

  def inception_score(self, splits: int = 10) -> tuple[float, float]:
    """IS over `splits` splits; with fewer images than splits (a small eval split), one image
    per split, with a warning: such a value is not comparable with published ones."""
    if 0 < self.num_images < splits:
      log.warning(
          "Inception Score of %d images: %d splits instead of the standard %d; not "
          "comparable with published values.",
          self.num_images,
          self.num_images,
          splits,
      )
      splits = self.num_images
    return inception_score(self.probabilities, splits)


class FeatureExtractor:
  """Inception features of uint8 image batches, sharded over the mesh's batch axes.

  In a multi-process job every process passes the same whole batch (gather the processes'
  shares first, as paper_metrics.eval_split_images does); each device featurizes its rows,
  and every process gets all the features back."""

  def __init__(
      self,
      weights_path: str,
      mesh=None,
      resize: str = "bilinear",
      batch_size: int = 64,
      log_every_seconds: float = 30.0,
  ):
    params = inception.load_params(weights_path)["params"]
    self.mesh = mesh or parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
    dp = parallel.data_parallel_size(self.mesh)
    self.batch_size = max(dp, batch_size // dp * dp)  # a multiple of the batch axes
    self.resize = resize
    self.log_every_seconds = log_every_seconds
    replicated = NamedSharding(self.mesh, P())
    self.params = parallel.replicate(params, self.mesh)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    model = inception.InceptionV3FID(resize=resize)

    def forward(params, images_uint8):
      out = model.apply({"params": params}, images_uint8.astype(jnp.float32) / 255.0)
      # The IS softmax is over the unbiased logits (pool @ W), as the reference tools compute it.
      return out["pool"], jax.nn.softmax(out["logits_unbiased"], axis=-1)

    self._forward = jax.jit(
        forward, in_shardings=(replicated, self.batch_sharding), out_shardings=replicated
    )

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, H, W, 3] with n <= batch_size -> (pool [n, 2048], probabilities [n, 1008])."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}.")
    n = images.shape[0]
    padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
    padded[:n] = images
    pool, probs = self._forward(self.params, jax.device_put(padded, self.batch_sharding))
    return np.asarray(pool)[:n], np.asarray(probs)[:n]

  def extract(
      self, batches: Iterable[np.ndarray], description: str, total: int | None = None
  ) -> Features:
    """Streams uint8 batches (any sizes) through Inception; logs progress with an ETA."""
    acc = FeatureAccumulator(self, description)
    start = last_log = time.time()
    for batch in batches:
      acc.add(batch)
      now = time.time()
      if now - last_log > self.log_every_seconds:
        last_log = now
        rate = acc.count / (now - start)
        eta = f", ETA {progress_log.format_duration((total - acc.count) / rate)}" if total else ""
        log.info(
            "inception features of %s: %d%s images (%.1f images/s%s)",
            description,
            acc.count,
            f" / {total}" if total else "",
            rate,
            eta,
        )
    log.info(
        "inception features of %s: %d images in %s",
        description,
        acc.count,
        progress_log.format_duration(time.time() - start),
    )
    return acc.result()


class FeatureAccumulator:
  """Adds uint8 batches of any size to running FID statistics and IS probabilities."""

  def __init__(self, extractor: FeatureExtractor, description: str):
    self.extractor = extractor
    self.description = description
    self.moments = RunningMoments(inception.NUM_FEATURES)
    self.probabilities: list[np.ndarray] = []

  @property
  def count(self) -> int:
    return self.moments.count

  def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, H, W, 3] of any n -> (pool [n, 2048], probabilities [n, 1008])."""
    step = self.extractor.batch_size
    parts = [self.extractor(images[i : i + step]) for i in range(0, len(images), step)]
    return (np.concatenate([p for p, _ in parts]), np.concatenate([q for _, q in parts]))

  def add(self, images: np.ndarray):
    self.add_features(*self.features(images))

  def add_features(self, pool: np.ndarray, probabilities: np.ndarray):
    """Adds features computed earlier (a resumed evaluation's saved ones), in the extractor's
    batches, so that the float64 moments come out as if the images were added now."""
    step = self.extractor.batch_size
    for i in range(0, len(pool), step):
      self.moments.update(pool[i : i + step])
      self.probabilities.append(probabilities[i : i + step])

  def result(self) -> Features:
    if not self.probabilities:
      raise ValueError(f"no images reached the Inception features of {self.description}.")
    return Features(self.moments.stats(self.description), np.concatenate(self.probabilities))
