"""Sample images from a trained VIM (stage 2), optionally with classifier rejection sampling.

  python -m vim_jax.sample --workdir=workdirs/vim --num_samples=64 [--classes=0,3]
      [--classifier_workdir=workdirs/classifier --acceptance=0.5] [--out=DIR]

Writes to --out (default WORKDIR/samples): samples.png (a grid, one column per class),
samples.npz (images uint8 [N, S, S, 3], labels int [N]) for evaluation, and results.json
with the class accuracy of the samples under the classifier, when one is given. With
--classifier_workdir and --acceptance < 1, rejection sampling (paper Sec. 4.2): for each
requested class, draw ceil(n / acceptance) candidates and keep the n that the classifier
gives the highest probability of that class.

On a multi-host slice every worker runs the same command (the --distributed flags are main's):
the samples are split over every device of every process, and process 0 writes the files.
"""

from __future__ import annotations

import json
import logging
import os

import jax
from absl import app, flags

from vim_jax.infra import distributed, log_filters, runs
from vim_jax.sampling import autoregressive, generation
from vim_jax.trainers import vim_step

log = logging.getLogger(__name__)


def define_flags():
  """The CLI flags (defined only when run as a program, so importing this module is free)."""
  flags.DEFINE_string("workdir", None, "A stage-2 (VIM) workdir.")
  flags.DEFINE_string("out", "", "Output folder; default WORKDIR/samples.")
  flags.DEFINE_integer("num_samples", 64, "How many samples (class-balanced).", lower_bound=1)
  flags.DEFINE_string("classes", "", "Comma-separated class ids; default all classes.")
  flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same samples.")
  flags.DEFINE_integer(
      "batch_size",
      None,
      "Samples per global batch (over every device), "
      "rounded down to a multiple of the devices. Default: the run's "
      "config.sampling.batch_size sequences per device (halved with guidance).",
      lower_bound=1,
  )
  flags.DEFINE_float("temperature", None, "Default: the run's config.sampling.temperature.")
  flags.DEFINE_integer("top_k", None, "0 = off. Default: the run's config.", lower_bound=0)
  flags.DEFINE_float("top_p", None, "1 = off. Default: the run's config.")
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance; 1 = off.")
  flags.DEFINE_string(
      "classifier_workdir",
      "",
      "A classifier workdir (configs/classifier.py) "
      "to score samples and for rejection sampling.",
  )
  flags.DEFINE_float(
      "acceptance", 1.0, "Rejection sampling acceptance rate (paper: 0.5); 1 = no rejection."
  )
  flags.register_validator(
      "acceptance",
      lambda a: 0 < a <= 1,
      "--acceptance must be in (0, 1]: the share of samples kept.",
  )
  distributed.define_flags()


def main(argv):
  log_filters.install()
  del argv
  FLAGS = flags.FLAGS
  distributed.start()
  trained = runs.load_vim(FLAGS.workdir)
  s = trained.config.sampling
  pick = lambda flag, default: default if flag is None else flag
  sampling_config = autoregressive.SamplingConfig(
      pick(FLAGS.temperature, s.temperature),
      pick(FLAGS.top_k, s.top_k),
      pick(FLAGS.top_p, s.top_p),
      pick(FLAGS.guidance_scale, s.guidance_scale),
  )
  labels = generation.requested_labels(FLAGS.num_samples, trained.model.num_classes, FLAGS.classes)
  results = generation.sample_and_report(
      trained,
      FLAGS.out or os.path.join(FLAGS.workdir, "samples"),
      labels,
      FLAGS.seed,
      sampling_config,
      FLAGS.classifier_workdir,
      FLAGS.acceptance,
      FLAGS.batch_size
      or vim_step.sampling_batch_size(
          trained.config,
          jax.device_count(),
          autoregressive.is_guided(trained.model, sampling_config),
      ),
  )
  if distributed.is_writer():
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
