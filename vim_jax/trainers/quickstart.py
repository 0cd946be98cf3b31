"""The quickstart pipeline: tokenizer, classifier, VIM, then scored class-conditional samples.

Run by `python -m vim_jax.main --config=configs/quickstart.py --workdir=DIR`; each stage writes
its own sub-workdir and resumes from it when rerun.
"""

from __future__ import annotations

import logging
import os
import time

import jax

from vim_jax.infra import preemption, runs, summaries
from vim_jax.sampling import generation
from vim_jax.trainers import classifier as classifier_trainer
from vim_jax.trainers import tokenizer as tokenizer_trainer
from vim_jax.trainers import vim as vim_trainer
from vim_jax.trainers import vim_step

log = logging.getLogger(__name__)


class Preempted(Exception):
  """SIGTERM arrived during a stage; that stage has saved its checkpoint."""


def train_and_evaluate(config, workdir: str, should_stop=None, devices=None) -> dict:
  try:
    return _run_pipeline(config, workdir, should_stop, devices)
  except Preempted as e:
    log.warning("quickstart: stopped during %s (SIGTERM); rerun the same command to resume", e)
    return {"preempted": str(e)}


def _run_pipeline(config, workdir: str, should_stop=None, devices=None) -> dict:
  """Runs the four stages; returns the sample results (class accuracy with and without
  rejection sampling)."""
  start = time.perf_counter()
  timings = {}

  def timed(name, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = time.perf_counter() - t
    if preemption.stopped_for_preemption():  # the stage saved and returned
      raise Preempted(name)
    log.info("quickstart: %s done in %.0f s", name, timings[name])
    return out

  tokenizer_dir = os.path.join(workdir, "tokenizer")
  stage1 = timed(
      "stage 1 (tokenizer)",
      tokenizer_trainer.train_and_evaluate,
      config.stage1,
      tokenizer_dir,
      devices=devices,
  )
  classifier = timed(
      "classifier",
      classifier_trainer.train_and_evaluate,
      config.classifier,
      os.path.join(workdir, "classifier"),
      devices=devices,
  )
  config.stage2.tokenizer_workdir = tokenizer_dir
  timed(
      "stage 2 (VIM)",
      vim_trainer.train_and_evaluate,
      config.stage2,
      os.path.join(workdir, "vim"),
      devices=devices,
  )

  trained = runs.load_vim(os.path.join(workdir, "vim"))
  labels = generation.requested_labels(config.num_samples, trained.model.num_classes, "")
  results = timed(
      "sampling",
      generation.sample_and_report,
      trained,
      os.path.join(workdir, "samples"),
      labels,
      config.sample_seed,
      vim_step.sampling_config_from(trained.config),
      os.path.join(workdir, "classifier"),
      config.acceptance,
  )
  writer = summaries.create_default_writer(
      os.path.join(workdir, "samples"), just_logging=jax.process_index() > 0
  )
  scalars = {
      "sample/class_accuracy": results["class_accuracy"],
      "sample/classifier_eval_accuracy": classifier.eval_metrics["accuracy"],
  }
  if "class_accuracy_rejection" in results:
    scalars["sample/class_accuracy_rejection"] = results["class_accuracy_rejection"]
  writer.write_scalars(trained.step, scalars)
  writer.flush()
  eval1 = stage1.eval_metrics or {}
  log.info(
      "quickstart finished in %.0f s (%s). tokenizer eval: PSNR %.2f dB, codebook usage "
      "%.1f%%; classifier eval top-1 %.3f; sample class accuracy %.3f, with rejection "
      "sampling at acceptance %.2f: %.3f",
      time.perf_counter() - start,
      ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
      eval1.get("psnr", float("nan")),
      100 * eval1.get("codebook_usage", float("nan")),
      classifier.eval_metrics["accuracy"],
      results["class_accuracy"],
      config.acceptance,
      results.get("class_accuracy_rejection", float("nan")),
  )
  return {
      **results,
      "timings": timings,
      "classifier_accuracy": classifier.eval_metrics["accuracy"],
      "stage1_eval": eval1,
  }
