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
  fid_vs_<reference>       gFID against --reference_stats (e.g. ADM's ImageNet train batch, the
                           paper's reference), else the run's config.fid.reference_stats, else
                           the eval split of the run's data (ImageNet runs warn that this is not
                           the paper's protocol),
  is_of_samples,
and with --classifier_workdir also class_accuracy and, at --acceptance < 1, the same metrics for
classifier rejection sampling (suffix _rejection<rate>).

Every process of a multi-host slice runs the same command (the --distributed flags and
auto-detection are main's): samples and Inception features are split over every device of
every process, and process 0 writes the results. A stage-2 evaluation saves each finished
batch under OUT/progress_<step>/ (vim_jax/evaluators/resumable.py): after a preemption
(SIGTERM stops it after the current batch, exit 0) or a crash, the same command continues where
it stopped, with the numbers an uninterrupted run gives, and logs its progress with an ETA.

Every value is written with what it was computed against and the number of images, to
OUT/results_<step>.json and to TensorBoard under OUT (default OUT = WORKDIR/eval). Images
reach Inception as uint8, as if saved to PNG, and are resized to 299 the pytorch-fid way
(--resize). `--save_reference_stats=PATH` writes the real images' statistics for reuse;
`--fid_between=A.npz,B.npz` prints the FID of two statistics files.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags

from vim_jax.evaluators import fid, paper_metrics, resumable
from vim_jax.infra import distributed, fileio, log_filters, preemption, runs
from vim_jax.trainers import vim_step

log = logging.getLogger(__name__)


def define_flags():
  """The CLI flags (defined only when run as a program, so importing this module is free)."""
  flags.DEFINE_string("workdir", None, "A stage-1 (tokenizer) or stage-2 (vim) workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  flags.DEFINE_string(
      "inception_weights",
      None,
      "Converted FID Inception weights "
      "(python -m vim_jax.tools.convert_inception); default the run's "
      "config.fid.inception_weights.",
  )
  flags.DEFINE_enum(
      "resize",
      "bilinear",
      ["bilinear", "bilinear_antialias"],
      "How images reach 299 px: pytorch-fid's bilinear, or antialiased.",
  )
  flags.DEFINE_integer(
      "batch_size",
      None,
      "Images per global batch (over every device) of "
      "sampling and Inception, rounded down to a multiple of the devices. "
      "Default: stage 2, the run's config.sampling.batch_size sequences per "
      "device (halved with guidance; benchmarks/RESULTS.md sizes it for TPU "
      "chips); stage 1, 64.",
      lower_bound=1,
  )
  flags.DEFINE_integer(
      "num_images",
      -1,
      "Stage 1: eval images to use; -1 = the run's "
      "num_eval_images (-1 there = the whole split).",
  )
  flags.DEFINE_integer(
      "num_samples", 50_000, "Stage 2: samples to draw (class-balanced).", lower_bound=1
  )
  flags.DEFINE_integer("seed", 0, "Stage 2: sampling seed.")
  flags.DEFINE_string(
      "reference_stats",
      "",
      "Stage 2: .npz with mu/sigma (ours or ADM's "
      "reference batches, e.g. VIRTUAL_imagenet256_labeled.npz, the paper's); "
      "default: the run's config.fid.reference_stats, else the eval split of "
      "the run's data (with a warning for ImageNet runs).",
  )
  flags.DEFINE_integer(
      "reference_images",
      -1,
      "Stage 2, without --reference_stats: eval "
      "images for the reference; -1 = the run's num_eval_images.",
  )
  flags.DEFINE_string("save_reference_stats", "", "Write the real images' statistics here.")
  flags.DEFINE_string(
      "classifier_workdir",
      "",
      "Stage 2: a classifier run for class accuracy and rejection sampling.",
  )
  flags.DEFINE_float(
      "acceptance",
      1.0,
      "Stage 2: rejection sampling acceptance rate (< 1 "
      "with --classifier_workdir adds the _rejection metrics).",
  )
  flags.register_validator(
      "acceptance",
      lambda a: 0 < a <= 1,
      "--acceptance must be in (0, 1]: the share of samples kept.",
  )
  flags.DEFINE_string("out", "", "Output folder; default WORKDIR/eval.")
  flags.DEFINE_string(
      "data_dir",
      "",
      "The tfds data_dir of the run's dataset, when it has "
      "moved since training; default: the one the run's config.json records.",
  )
  flags.DEFINE_list(
      "fid_between",
      [],
      "Two statistics files A.npz,B.npz: print their FID and exit (no workdir needed).",
  )
  distributed.define_flags()


def moved_data(config):
  """`config` (in place) reading its tfds data from --data_dir, when given."""
  data_dir = flags.FLAGS.data_dir
  if data_dir:
    config.data.data_dir = fileio.absolute(data_dir)
  return config


def main(argv):
  log_filters.install()
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.fid_between:
    if len(FLAGS.fid_between) != 2:
      raise app.UsageError(f"--fid_between takes two files, got {FLAGS.fid_between}.")
    a, b = (fid.FeatureStats.load(p) for p in FLAGS.fid_between)
    print(
        f"FID({a.description} [{a.num_images or '?'} images], {b.description} "
        f"[{b.num_images or '?'} images]) = {fid.fid_from_stats(a, b):.6g}"
    )
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (a stage-1 or stage-2 run).")
  distributed.start()
  preemption.install_preemption_handler()  # SIGTERM: stop after the current batch, exit 0
  out = FLAGS.out or os.path.join(FLAGS.workdir, "eval")
  config = moved_data(runs.read_run_config(FLAGS.workdir))
  if config.trainer not in ("tokenizer", "vim"):
    raise app.UsageError(
        f"{FLAGS.workdir!r} holds a {config.trainer!r} run; evaluate takes a "
        "stage-1 ('tokenizer') or stage-2 ('vim') workdir."
    )
  weights = FLAGS.inception_weights or config.fid.inception_weights
  batch_size = FLAGS.batch_size or (
      vim_step.sampling_batch_size(config, jax.device_count()) if config.trainer == "vim" else 64
  )
  extractor = fid.FeatureExtractor(weights, resize=FLAGS.resize, batch_size=batch_size)
  info = {
      "workdir": FLAGS.workdir,
      "trainer": config.trainer,
      "inception": {"weights": weights, "resize": FLAGS.resize},
  }
  if config.trainer == "tokenizer":
    tok = runs.load_tokenizer(FLAGS.workdir, FLAGS.step)
    moved_data(tok.config)
    results, real = paper_metrics.evaluate_tokenizer(tok, extractor, FLAGS.num_images)
    step = tok.step
  else:  # vim
    trained = runs.load_vim(FLAGS.workdir, FLAGS.step)
    reference = FLAGS.reference_stats or config.fid.reference_stats
    real = paper_metrics.reference_stats(config, extractor, reference, FLAGS.reference_images)
    label = paper_metrics.reference_label_for(reference, config, real)
    step = trained.step
    sampling = vim_step.sampling_config_from(config)
    info["sampling"] = sampling.__dict__
    try:
      progress = resumable.ShardedProgress(
          os.path.join(out, f"progress_{step:08d}"),
          {
              **info,
              "step": step,
              "num_samples": FLAGS.num_samples,
              "seed": FLAGS.seed,
              "classifier_workdir": FLAGS.classifier_workdir,
              "acceptance": FLAGS.acceptance,
              "reference": label,
              # The global batch (--batch_size rounded to the devices): which samples a batch
              # draws and how the statistics are summed. A slice of another size resumes with
              # the --batch_size that gives the same.
              "global_batch_size": extractor.batch_size,
          },
      )
    except resumable.IdentityMismatch as e:
      raise app.UsageError(str(e)) from None
    results = paper_metrics.evaluate_generator(
        trained,
        extractor,
        real,
        label,
        FLAGS.num_samples,
        FLAGS.seed,
        sampling,
        batch_size,
        FLAGS.classifier_workdir,
        FLAGS.acceptance,
        progress,
    )
    if results is None:
      print(
          f"stopped by SIGTERM; progress saved in {progress.directory}: run the same command "
          "to continue."
      )
      return
  if FLAGS.save_reference_stats and distributed.is_writer():
    real.save(FLAGS.save_reference_stats)
    log.info("reference statistics written to %s", FLAGS.save_reference_stats)
  path = paper_metrics.write_results(out, step, results, info)
  if config.trainer == "vim":
    progress.remove()  # the results hold all of it now
  print(
      f"{config.trainer} run {FLAGS.workdir}, step {step}:\n"
      f"{paper_metrics.format_results(results)}\nwritten to {path}"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
