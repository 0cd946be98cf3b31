"""One command for the numbers papers report: FID / IS with the standard InceptionV3, and more.

  python -m vim_jax.evaluate --workdir=WORKDIR [--inception_weights=PATH] [flags]

A stage-1 (ViT-VQGAN) workdir: one pass over the run's eval split (--num_images caps it)
reconstructs every image and reports
  rfid_vs_<data>           FID of the reconstructions against the same eval images (rFID),
  is_of_reconstructions    Inception Score of the reconstructions (mean; _std over 10 splits),
  psnr, ssim, l1, l2, lpips (when the run's LPIPS weights exist), codebook_usage(_per_256),
  perplexity.
A stage-2 (VIM) workdir: draws --num_samples samples (class-balanced when class-conditional;
the paper's 50k by default) and reports
  fid_vs_<reference>       gFID against --reference_stats (e.g. ADM's ImageNet train batch) or,
                           by default, the eval split of the run's data,
  is_of_samples,
and with --classifier_workdir also class_accuracy and, at --acceptance < 1, the same metrics for
classifier rejection sampling (suffix _rejection<rate>).

Every value is written with what it was computed against and the number of images, to
OUT/results_<step>.json and to TensorBoard under OUT (default OUT = WORKDIR/eval). Images
reach Inception as uint8, as if saved to PNG, and are resized to 299 the pytorch-fid way
(--resize). `--save_reference_stats=PATH` writes the real images' statistics for reuse;
`--fid_between=A.npz,B.npz` prints the FID of two statistics files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax import (evaluators, fid, fileio, parallel, runs, sample, sampling, stage1, stage2)
from vim_jax.data import pipeline

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Stage 1.
# ----------------------------------------------------------------------------------------------
def evaluate_tokenizer(tok: runs.Tokenizer, extractor: fid.FeatureExtractor,
                       max_images: int = -1) -> tuple[dict[str, dict], fid.FeatureStats]:
  """Every stage-1 metric over the eval split; returns (metrics, the real images' statistics)."""
  from vim_jax.models import lpips as lpips_lib
  config = ml_collections.ConfigDict(tok.config.to_dict())
  if max_images > 0:
    config.num_eval_images = max_images
  mesh = extractor.mesh
  dp = parallel.data_parallel_size(mesh)
  config.eval_batch_size = max(dp, config.eval_batch_size // dp * dp)
  _, eval_data = pipeline.build_pipelines(config, jax.process_index(), jax.process_count())
  models = stage1.build_models(config)
  replicated = NamedSharding(mesh, P())
  lpips_params = {}
  if models.lpips is not None:
    lpips_params = jax.device_put(lpips_lib.load_params(config.perceptual_weights)["params"],
                                  replicated)
  eval_step = jax.jit(stage1.make_eval_step(models))
  consumer = evaluators.ReconstructionFID(extractor, evaluators.data_label(config.data))
  image_metrics, _ = stage1.evaluate(
      eval_step, jax.device_put(tok.params, replicated), lpips_params, eval_data, mesh,
      tok.model.codebook_size, config.eval_usage_chunk, consume=consumer)
  n = image_metrics.pop("num_images")
  results = {k: evaluators.metric(v, n) for k, v in image_metrics.items()}
  results.update(consumer.results())
  return results, consumer.real_stats()


# ----------------------------------------------------------------------------------------------
# Stage 2.
# ----------------------------------------------------------------------------------------------
def _tap(batches: Iterator[np.ndarray], fn: Callable[[np.ndarray, int], None]):
  """Yields the batches unchanged, calling fn(batch, offset) on each."""
  offset = 0
  for batch in batches:
    fn(batch, offset)
    offset += len(batch)
    yield batch


def evaluate_generator(trained: runs.TrainedVIM, extractor: fid.FeatureExtractor,
                       reference: fid.FeatureStats, reference_label: str, num_samples: int,
                       seed: int, sampling_config: sampling.SamplingConfig,
                       batch_size: int = 64, classifier_workdir: str = "",
                       acceptance: float = 1.0) -> dict[str, dict]:
  """gFID and IS of num_samples class-balanced samples (and with rejection sampling)."""
  labels = sample.requested_labels(num_samples, trained.model.num_classes, "")
  sampler = sample.Sampler(trained, sampling_config, batch_size)
  against = f"{reference.description} ({reference.num_images or '?'} images)"
  classifier = None
  if classifier_workdir:
    if trained.model.num_classes == 0:
      raise ValueError("--classifier_workdir scores class-conditional samples; this VIM is "
                       "unconditional.")
    classifier, classifier_params = runs.load_classifier(classifier_workdir)
  correct = [0]

  def score(batch, offset):
    if classifier is not None:
      probs = sample.class_probabilities(classifier, classifier_params, batch)
      correct[0] += int(np.sum(np.argmax(probs, -1) == labels[offset:offset + len(batch)]))

  feats = extractor.extract(_tap(sampler.batches(labels, seed), score), "samples", num_samples)
  results = evaluators.generator_metrics(feats, reference, reference_label, against, "")
  if classifier is None:
    return results
  results["class_accuracy"] = evaluators.metric(correct[0] / num_samples, num_samples,
                                                classifier_workdir)
  if acceptance < 1:
    suffix = f"_rejection{acceptance:g}"
    acc = fid.FeatureAccumulator(extractor, f"samples{suffix}")
    kept_correct = 0
    for where, kept, _ in sample.rejection_batches(sampler, labels, seed, classifier,
                                                   classifier_params, acceptance):
      acc.add(kept)
      probs = sample.class_probabilities(classifier, classifier_params, kept)
      kept_correct += int(np.sum(np.argmax(probs, -1) == labels[where]))
    results.update(evaluators.generator_metrics(acc.result(), reference, reference_label,
                                                against, suffix))
    results[f"class_accuracy{suffix}"] = evaluators.metric(kept_correct / num_samples,
                                                           num_samples, classifier_workdir)
  return results


# ----------------------------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------------------------
def write_results(out_dir: str, step: int, results: dict[str, dict], info: dict) -> str:
  """OUT/results_<step>.json and TensorBoard scalars eval/<name> at `step`."""
  from clu import metric_writers
  fileio.makedirs(out_dir)
  path = fileio.join(out_dir, f"results_{step:08d}.json")
  if jax.process_index() == 0:
    fileio.write_json(path, {**info, "step": step, "metrics": results})
  writer = metric_writers.create_default_writer(out_dir,
                                                just_logging=jax.process_index() != 0)
  writer.write_scalars(step, {f"eval/{k}": v["value"] for k, v in results.items()})
  writer.flush()
  return path


def format_results(results: dict[str, dict]) -> str:
  rows = []
  for name, m in results.items():
    against = f"  vs {m['against']}" if "against" in m else ""
    rows.append(f"  {name:<36} {m['value']:>12.5g}  ({m['num_images']} images){against}")
  return "\n".join(rows)


def define_flags():
  """The CLI flags (defined only when run as a program, so importing this module is free)."""
  flags.DEFINE_string("workdir", None, "A stage-1 (vitvq) or stage-2 (vim) workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  flags.DEFINE_string("inception_weights", None, "Converted FID Inception weights "
                      "(python -m vim_jax.tools.convert_inception); default the run's "
                      "config.fid.inception_weights.")
  flags.DEFINE_enum("resize", "bilinear", ["bilinear", "bilinear_antialias"],
                    "How images reach 299 px: pytorch-fid's bilinear, or antialiased.")
  flags.DEFINE_integer("batch_size", 64, "Images per Inception / sampling batch.")
  flags.DEFINE_integer("num_images", -1, "Stage 1: eval images to use; -1 = the run's "
                       "num_eval_images (-1 there = the whole split).")
  flags.DEFINE_integer("num_samples", 50_000, "Stage 2: samples to draw (class-balanced).")
  flags.DEFINE_integer("seed", 0, "Stage 2: sampling seed.")
  flags.DEFINE_string("reference_stats", "", "Stage 2: .npz with mu/sigma (ours or ADM's "
                      "reference batches); default: the eval split of the run's data.")
  flags.DEFINE_integer("reference_images", -1, "Stage 2, without --reference_stats: eval "
                       "images for the reference; -1 = the run's num_eval_images.")
  flags.DEFINE_string("save_reference_stats", "", "Write the real images' statistics here.")
  flags.DEFINE_string("classifier_workdir", "", "Stage 2: a classifier run for class accuracy "
                      "and rejection sampling.")
  flags.DEFINE_float("acceptance", 1.0, "Stage 2: rejection sampling acceptance rate (< 1 "
                     "with --classifier_workdir adds the _rejection metrics).")
  flags.DEFINE_string("out", "", "Output folder; default WORKDIR/eval.")
  flags.DEFINE_list("fid_between", [], "Two statistics files A.npz,B.npz: print their FID and "
                    "exit (no workdir needed).")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.fid_between:
    if len(FLAGS.fid_between) != 2:
      raise app.UsageError(f"--fid_between takes two files, got {FLAGS.fid_between}.")
    a, b = (fid.FeatureStats.load(p) for p in FLAGS.fid_between)
    print(f"FID({a.description} [{a.num_images or '?'} images], {b.description} "
          f"[{b.num_images or '?'} images]) = {fid.fid_from_stats(a, b):.6g}")
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (a stage-1 or stage-2 run).")
  config = runs.read_run_config(FLAGS.workdir)
  fid_config = config.get("fid") or ml_collections.ConfigDict({})
  weights = FLAGS.inception_weights or fid_config.get(
      "inception_weights", "weights/pt_inception-2015-12-05.msgpack")
  extractor = fid.FeatureExtractor(weights, resize=FLAGS.resize, batch_size=FLAGS.batch_size)
  info = {"workdir": FLAGS.workdir, "trainer": config.trainer,
          "inception": {"weights": weights, "resize": FLAGS.resize}}
  if config.trainer == "vitvq":
    tok = runs.load_tokenizer(FLAGS.workdir, FLAGS.step)
    results, real = evaluate_tokenizer(tok, extractor, FLAGS.num_images)
    step = tok.step
  elif config.trainer == "vim":
    trained = runs.load_vim(FLAGS.workdir, FLAGS.step)
    real = evaluators.reference_stats(config, extractor, FLAGS.reference_stats,
                                      FLAGS.reference_images)
    label = evaluators.reference_label_for(FLAGS.reference_stats, config, real)
    results = evaluate_generator(
        trained, extractor, real, label, FLAGS.num_samples, FLAGS.seed,
        stage2.sampling_config_from(config), FLAGS.batch_size, FLAGS.classifier_workdir,
        FLAGS.acceptance)
    step = trained.step
    info["sampling"] = stage2.sampling_config_from(config).__dict__
  else:
    raise app.UsageError(f"{FLAGS.workdir!r} holds a {config.trainer!r} run; evaluate takes a "
                         "stage-1 ('vitvq') or stage-2 ('vim') workdir.")
  if FLAGS.save_reference_stats:
    real.save(FLAGS.save_reference_stats)
    log.info("reference statistics written to %s", FLAGS.save_reference_stats)
  path = write_results(FLAGS.out or os.path.join(FLAGS.workdir, "eval"), step, results, info)
  print(f"{config.trainer} run {FLAGS.workdir}, step {step}:\n{format_results(results)}\n"
        f"written to {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
