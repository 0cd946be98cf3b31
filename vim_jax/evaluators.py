"""The FID / IS evaluators shared by `python -m vim_jax.evaluate` and the trainers.

They consume uint8 images (as if saved to PNG) and label every value with what it was computed
against and on how many images: {'value', 'num_images', 'against'}.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from vim_jax import fid
from vim_jax.data import pipeline, preprocess

log = logging.getLogger(__name__)


def data_label(data_config: ml_collections.ConfigDict) -> str:
  """What a run's eval split is called in metric names, e.g. 'imagenet2012_validation'."""
  source = data_config.source
  if source == "tfds":
    return f"{data_config.name}_{data_config.eval_split}".replace("/", "_")
  if source == "shapes":
    return "shapes_eval"
  if source == "folder":
    return f"{os.path.basename(os.path.normpath(data_config.folder))}_eval"
  raise ValueError(f"data.source={source!r} holds no images to compare with; pass reference "
                   "statistics (--reference_stats, config.fid.reference_stats).")


def metric(value: float, num_images: int, against: str = "") -> dict:
  entry = {"value": float(value), "num_images": int(num_images)}
  if against:
    entry["against"] = against
  return entry


def eval_split_images(config: ml_collections.ConfigDict, max_images: int = -1
                      ) -> tuple[Iterator[np.ndarray], int]:
  """(uint8 batches of the run's eval split, their number), up to max_images (-1 = the run's
  num_eval_images)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if max_images > 0:
    config.num_eval_images = max_images
  _, eval_data = pipeline.build_pipelines(config, jax.process_index(), jax.process_count())
  batches = (preprocess.to_uint8(b["image"][b["mask"].astype(bool)]) for b in eval_data.iterate())
  return batches, eval_data.num_examples


def reference_stats(config: ml_collections.ConfigDict, extractor: fid.FeatureExtractor,
                    path: str = "", max_images: int = -1) -> fid.FeatureStats:
  """Statistics from `path`, or computed over the run's eval split (labelled with data_label)."""
  if path:
    stats = fid.FeatureStats.load(path)
    log.info("reference statistics %s: %s (%s images)", path, stats.description,
             stats.num_images or "?")
    return stats
  batches, total = eval_split_images(config, max_images)
  return extractor.extract(batches, data_label(config.data), total).stats


class ReconstructionFID:
  """Consumes (images, reconstructions) uint8 batches of one eval pass; then rFID and IS.

  reference: statistics of the real images when they are already known (trainers compute
  them once per run); otherwise the real images of the same pass are featurized too."""

  def __init__(self, extractor: fid.FeatureExtractor, label: str,
               reference: fid.FeatureStats | None = None):
    self.label = label
    self.reference = reference
    self.real = None if reference else fid.FeatureAccumulator(extractor, label)
    self.recon = fid.FeatureAccumulator(extractor, f"reconstructions of {label}")

  def __call__(self, images: np.ndarray, reconstructions: np.ndarray):
    if self.real is not None:
      self.real.add(images)
    self.recon.add(reconstructions)

  def real_stats(self) -> fid.FeatureStats:
    return self.reference or self.real.result().stats

  def results(self) -> dict[str, dict]:
    real, recon = self.real_stats(), self.recon.result()
    mean, std = recon.inception_score()
    n = recon.num_images
    return {f"rfid_vs_{self.label}": metric(fid.fid_from_stats(recon.stats, real), n,
                                            f"{real.description} ({real.num_images} images)"),
            "is_of_reconstructions": metric(mean, n), "is_of_reconstructions_std": metric(std, n)}


def generator_metrics(feats: fid.Features, reference: fid.FeatureStats, reference_label: str,
                       against: str, suffix: str) -> dict[str, dict]:
  mean, std = feats.inception_score()
  n = feats.num_images
  return {f"fid_vs_{reference_label}{suffix}": metric(fid.fid_from_stats(feats.stats, reference),
                                                      n, against),
          f"is_of_samples{suffix}": metric(mean, n), f"is_of_samples{suffix}_std": metric(std, n)}


def reference_label_for(path: str, config: ml_collections.ConfigDict,
                        stats: fid.FeatureStats) -> str:
  if not path:
    return data_label(config.data)
  return stats.description if stats.num_images else os.path.splitext(os.path.basename(path))[0]
