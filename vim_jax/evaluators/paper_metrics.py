"""The numbers papers report, computed for a trained run: every stage-1 metric of a tokenizer
(rFID, IS, PSNR, SSIM, LPIPS, codebook usage) and gFID / IS / class accuracy of a VIM's samples,
plus the FID evaluators the trainers share. The library behind `python -m vim_jax.evaluate`.

Evaluators consume uint8 images (as if saved to PNG) and label every value with what it was
computed against and on how many images: {'value', 'num_images', 'against'}.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.data import pipeline
from vim_jax.evaluators import fid, resumable
from vim_jax.infra import fileio, parallel, preemption, progress_log, runs
from vim_jax.models import lpips as lpips_lib
from vim_jax.sampling import autoregressive, generation
from vim_jax.trainers import tokenizer_step

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
  raise ValueError(
      f"data.source={source!r} holds no images to compare with; pass reference "
      "statistics (--reference_stats, config.fid.reference_stats)."
  )


def metric(value: float, num_images: int, against: str = "") -> dict:
  entry = {"value": float(value), "num_images": int(num_images)}
  if against:
    entry["against"] = against
  return entry


def eval_split_images(
    config: ml_collections.ConfigDict, max_images: int = -1, mesh=None
) -> tuple[Iterator[np.ndarray], int]:
  """(uint8 batches of the run's eval split, their number), up to max_images (-1 = the run's
  num_eval_images). Every process gets the same, whole batches: each reads the rows its
  devices hold in `mesh` (default: every device on the batch) and they are gathered, as the
  FeatureExtractor expects (the same images on every process; each device featurizes its rows
  of them)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if max_images > 0:
    config.num_eval_images = max_images
  several = jax.process_count() > 1
  if several:
    mesh = mesh or parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  _, eval_data = pipeline.build_pipelines(config, mesh if several else None)

  def whole_batches():
    for local in eval_data.iterate():
      images, mask = local["image"], local["mask"]  # this process's rows, uint8 and {0, 1}
      if several:
        batch = parallel.global_batch_from_local(
            {"image": images, "mask": mask},
            mesh,
            eval_data.global_batch_size,
            images_from_uint8=False,
        )
        images, mask = parallel.fetch((batch["image"], batch["mask"]))
      yield images[mask.astype(bool)]

  return whole_batches(), eval_data.num_examples


ADM_IMAGENET256_REFERENCE = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
    "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"
)


def not_the_papers_protocol(config: ml_collections.ConfigDict, path: str) -> str | None:
  """The warning for gFID of an ImageNet run against its own eval split, or None."""
  if path or config.data.source not in ("tfds", "folder"):
    return None
  label = data_label(config.data)
  if "imagenet" not in label.lower():
    return None
  return (
      f"gFID against {label} (the run's eval split, at most num_eval_images="
      f"{config.num_eval_images} images) is not the paper's protocol, which compares 50,000 "
      f"samples with ADM's ImageNet 256x256 training reference batch. Get that file once "
      f"(curl -LO {ADM_IMAGENET256_REFERENCE}) and pass "
      "--reference_stats=VIRTUAL_imagenet256_labeled.npz to vim_jax.evaluate (or set "
      "config.fid.reference_stats), with --num_samples=50000."
  )


def reference_stats(
    config: ml_collections.ConfigDict,
    extractor: fid.FeatureExtractor,
    path: str = "",
    max_images: int = -1,
) -> fid.FeatureStats:
  """Statistics from `path`, or computed over the run's eval split (labelled with data_label;
  for an ImageNet run, with a warning that this is not the paper's reference)."""
  if path:
    stats = fid.FeatureStats.load(path)
    log.info(
        "reference statistics %s: %s (%s images)", path, stats.description, stats.num_images or "?"
    )
    return stats
  warning = not_the_papers_protocol(config, path)
  if warning:
    log.warning(warning)
  batches, total = eval_split_images(
      config, max_images, extractor.mesh if extractor is not None else None
  )
  return extractor.extract(batches, data_label(config.data), total).stats


class ReconstructionFID:
  """Consumes (images, reconstructions) uint8 batches of one eval pass; then rFID and IS.

  reference: statistics of the real images when they are already known (trainers compute
  them once per run); otherwise the real images of the same pass are featurized too."""

  def __init__(
      self, extractor: fid.FeatureExtractor, label: str, reference: fid.FeatureStats | None = None
  ):
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
    return {
        f"rfid_vs_{self.label}": metric(
            fid.fid_from_stats(recon.stats, real),
            n,
            f"{real.description} ({real.num_images} images)",
        ),
        "is_of_reconstructions": metric(mean, n),
        "is_of_reconstructions_std": metric(std, n),
    }


def generator_metrics(
    feats: fid.Features,
    reference: fid.FeatureStats,
    reference_label: str,
    against: str,
    suffix: str,
) -> dict[str, dict]:
  mean, std = feats.inception_score()
  n = feats.num_images
  return {
      f"fid_vs_{reference_label}{suffix}": metric(
          fid.fid_from_stats(feats.stats, reference), n, against
      ),
      f"is_of_samples{suffix}": metric(mean, n),
      f"is_of_samples{suffix}_std": metric(std, n),
  }


def reference_label_for(
    path: str, config: ml_collections.ConfigDict, stats: fid.FeatureStats
) -> str:
  if not path:
    return data_label(config.data)
  return stats.description if stats.num_images else os.path.splitext(os.path.basename(path))[0]


# ----------------------------------------------------------------------------------------------
# Stage 1.
# ----------------------------------------------------------------------------------------------
def evaluate_tokenizer(
    tok: runs.Tokenizer, extractor: fid.FeatureExtractor, max_images: int = -1
) -> tuple[dict[str, dict], fid.FeatureStats]:
  """Every stage-1 metric over the eval split; returns (metrics, the real images' statistics)."""
  config = ml_collections.ConfigDict(tok.config.to_dict())
  if max_images > 0:
    config.num_eval_images = max_images
  mesh = extractor.mesh
  dp = parallel.data_parallel_size(mesh)
  config.eval_batch_size = max(dp, config.eval_batch_size // dp * dp)
  _, eval_data = pipeline.build_pipelines(config, mesh)
  models = tokenizer_step.build_models(config)
  replicated = NamedSharding(mesh, P())
  lpips_params = {}
  if models.lpips is not None:
    lpips_params = jax.device_put(
        lpips_lib.load_params(config.perceptual_weights)["params"], replicated
    )
  eval_step = jax.jit(tokenizer_step.make_eval_step(models))
  consumer = ReconstructionFID(extractor, data_label(config.data))
  image_metrics, _ = tokenizer_step.evaluate(
      eval_step,
      jax.device_put(tok.params, replicated),
      lpips_params,
      eval_data,
      mesh,
      tok.model.codebook_size,
      config.eval_usage_chunk,
      consume=consumer,
  )
  n = image_metrics.pop("num_images")
  results = {k: metric(v, n) for k, v in image_metrics.items()}
  results.update(consumer.results())
  return results, consumer.real_stats()


# ----------------------------------------------------------------------------------------------
# Stage 2.
# ----------------------------------------------------------------------------------------------
def evaluate_generator(
    trained: runs.TrainedVIM,
    extractor: fid.FeatureExtractor,
    reference: fid.FeatureStats,
    reference_label: str,
    num_samples: int,
    seed: int,
    sampling_config: autoregressive.SamplingConfig,
    batch_size: int = 64,
    classifier_workdir: str = "",
    acceptance: float = 1.0,
    progress: resumable.ShardedProgress | None = None,
) -> dict[str, dict] | None:
  """gFID and IS of num_samples class-balanced samples (and with rejection sampling).

  With `progress`, every finished batch (and rejection class) is saved there and a rerun
  continues after the last one (vim_jax/evaluators/resumable.py). Returns None when a SIGTERM
  stopped it (progress saved)."""
  labels = generation.requested_labels(num_samples, trained.model.num_classes, "")
  sampler = generation.Sampler(trained, sampling_config, batch_size)
  against = f"{reference.description} ({reference.num_images or '?'} images)"
  classifier = classifier_params = None
  if classifier_workdir:
    if trained.model.num_classes == 0:
      raise ValueError(
          "--classifier_workdir scores class-conditional samples; this VIM is unconditional."
      )
    classifier, classifier_params = runs.load_classifier(classifier_workdir)
  samples = fid.FeatureAccumulator(extractor, "samples")

  def sample_batch(i: int):
    images = sampler.batch(labels, seed, i)
    correct = 0
    if classifier is not None:
      probs = generation.class_probabilities(classifier, classifier_params, images)
      wanted = labels[i * sampler.batch_size : i * sampler.batch_size + len(images)]
      correct = int(np.sum(np.argmax(probs, -1) == wanted))
    return (*samples.features(images), correct)

  num_batches = sampler.num_batches(num_samples)
  correct = _resumable_pass(
      "samples",
      num_batches,
      sample_batch,
      samples,
      progress,
      unit_images=sampler.batch_size,
      total_images=num_samples,
  )
  if correct is None:
    return None
  results = generator_metrics(samples.result(), reference, reference_label, against, "")
  if classifier is None:
    return results
  results["class_accuracy"] = metric(correct / num_samples, num_samples, classifier_workdir)
  if acceptance < 1:
    suffix = f"_rejection{acceptance:g}"
    kept = fid.FeatureAccumulator(extractor, f"samples{suffix}")
    classes = np.unique(labels)

    def rejection_class(j: int):
      c = int(classes[j])
      images, probs = generation.rejection_for_class(
          sampler, c, int(np.sum(labels == c)), seed, classifier, classifier_params, acceptance
      )
      return (*kept.features(images), int(np.sum(np.argmax(probs, -1) == c)))

    kept_correct = _resumable_pass(
        f"rejection{acceptance:g}",
        len(classes),
        rejection_class,
        kept,
        progress,
        unit_images=num_samples / len(classes),
        total_images=num_samples,
        step_offset=num_batches,
    )
    if kept_correct is None:
      return None
    results.update(generator_metrics(kept.result(), reference, reference_label, against, suffix))
    results[f"class_accuracy{suffix}"] = metric(
        kept_correct / num_samples, num_samples, classifier_workdir
    )
  return results


def _resumable_pass(
    phase: str,
    num_units: int,
    compute: Callable,
    accumulator,
    progress: resumable.ShardedProgress | None,
    unit_images: float,
    total_images: int,
    step_offset: int = 0,
    log_every_seconds: float = 30.0,
) -> int | None:
  """Runs compute(unit) -> (pool [n, 2048], probabilities [n, 1008], correct) for every unit
  in order, adding the features to `accumulator`; units an earlier run finished are read
  from `progress` instead. Returns the summed `correct`, or None when a SIGTERM asked to stop
  (every process stops after the same unit: preemption.preemption_requested)."""
  done = progress.finished_units(phase) if progress else 0
  correct = 0
  for unit in range(done):
    shard = progress.load(phase, unit)
    accumulator.add_features(shard["pool"], shard["probabilities"])
    correct += int(shard["correct"])
  if done:
    log.info(
        "%s: resumed after %d of %d units (%d images) saved in %s",
        phase,
        done,
        num_units,
        accumulator.count,
        progress.directory,
    )
  start = last_log = time.time()
  for unit in range(done, num_units):
    pool, probabilities, unit_correct = compute(unit)
    if progress:
      progress.save(
          phase, unit, pool=pool, probabilities=probabilities, correct=np.int64(unit_correct)
      )
    accumulator.add_features(pool, probabilities)
    correct += unit_correct
    now = time.time()
    if now - last_log > log_every_seconds or unit + 1 == num_units:
      last_log = now
      rate = (unit + 1 - done) * unit_images / (now - start)
      left = (num_units - unit - 1) * unit_images / rate
      log.info(
          "%s: %d / %d images (%d / %d units), %.2f images/s, ETA %s",
          phase,
          accumulator.count,
          total_images,
          unit + 1,
          num_units,
          rate,
          progress_log.format_duration(left),
      )
    if preemption.preemption_requested(step_offset + unit):
      log.info(
          "%s: stopped by SIGTERM after unit %d of %d; progress is saved: run the same "
          "command to continue.",
          phase,
          unit + 1,
          num_units,
      )
      return None
  return correct


# ----------------------------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------------------------
def write_results(out_dir: str, step: int, results: dict[str, dict], info: dict) -> str:
  """OUT/results_<step>.json and TensorBoard scalars eval/<name> at `step`."""
  from vim_jax.infra import summaries  # lazy: loads TensorFlow (clu's writers); only this needs it

  fileio.makedirs(out_dir)
  path = fileio.join(out_dir, f"results_{step:08d}.json")
  if jax.process_index() == 0:
    fileio.write_json(path, {**info, "step": step, "metrics": results})
  writer = summaries.create_default_writer(out_dir, just_logging=jax.process_index() != 0)
  writer.write_scalars(step, {f"eval/{k}": v["value"] for k, v in results.items()})
  writer.flush()
  return path


def format_results(results: dict[str, dict]) -> str:
  rows = []
  for name, m in results.items():
    against = f"  vs {m['against']}" if "against" in m else ""
    rows.append(f"  {name:<36} {m['value']:>12.5g}  ({m['num_images']} images){against}")
  return "\n".join(rows)
