"""The training loop every trainer runs, and the start-up they share.

A trainer reads top to bottom: `start` (workdir, mesh, input, checkpointer), its models and
optimizer, `create_or_restore_state`, `compile_train_steps`, then `train`, which steps, logs
(one step late, so the device queue never drains), evaluates, checkpoints and stops on NaN or
preemption. Trainers differ only in what they pass in: their step programs, the arrays a batch
feeds them, their log line and their evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.data import pipeline
from vim_jax.infra import (
    checkpoint,
    config_checks,
    fileio,
    flops,
    parallel,
    preemption,
    runs,
    summaries,
)
from vim_jax.infra.progress_log import Progress
from vim_jax.models import inception
from vim_jax.trainers import compiling

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """What every trainer sets up before its models: the config, the workdir and its metric
  writer, the mesh and its logical axis rules, the input pipelines and the checkpointer."""

  config: ml_collections.ConfigDict
  workdir: str
  writer: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  train_data: pipeline.InputPipeline
  eval_data: pipeline.InputPipeline
  ckpt: checkpoint.Checkpointer

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def data_parallel(self) -> int:
    return parallel.data_parallel_size(self.mesh)

  @property
  def batch_sharding(self) -> NamedSharding:
    return parallel.batch_sharding(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def peak_flops(self) -> float | None:
    return flops.peak_flops_per_second(self.mesh.devices.flat[0])


@dataclasses.dataclass
class RunResult:
  """What a call of a trainer's train_and_evaluate leaves behind (besides the workdir)."""

  state: Any
  train_metrics: list[dict[str, float]]  # host means at each log point, with "step"
  eval_metrics: dict[str, float] | None  # the last evaluation


def open_workdir(workdir: str, config):
  """Checks the config's values, creates the workdir, writes config.json (process 0) and
  returns the metric writer. Only process 0 writes TensorBoard summaries; the others log."""
  config_checks.check(config)  # before anything is written or compiled
  fileio.makedirs(workdir)
  runs.write_config(workdir, config)
  return summaries.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def check_divisible(mesh, **batch_sizes):
  """Every batch size must split evenly over the data-parallel devices."""
  dp = parallel.data_parallel_size(mesh)
  for name, size in batch_sizes.items():
    if size % dp:
      raise ValueError(
          f"config.{name}={size} is not divisible by the data-parallel size {dp} "
          f"(mesh {dict(mesh.shape)}); use a multiple of {dp}."
      )


def start(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> Run:
  """The workdir, mesh (over `devices`, default all), input pipelines and checkpointer of a
  run, each checked before anything compiles."""
  writer = open_workdir(workdir, config)
  if "fid" in config and config.fid.every > 0:
    inception.check_weights(config.fid.inception_weights)  # now, not after minutes of compiling
  log.info(
      "devices: %d x %s, processes: %d",
      len(devices or jax.devices()),
      jax.devices()[0].platform,
      jax.process_count(),
  )
  mesh = parallel.create_mesh(config.mesh, devices)
  log.info("mesh: %s", dict(mesh.shape))
  check_divisible(mesh, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size)
  train_data, eval_data = pipeline.build_pipelines(config, mesh)
  log.info(
      "data: %s, %d train / %d eval examples, %d classes",
      config.data.source,
      train_data.num_examples,
      eval_data.num_examples,
      train_data.num_classes,
  )
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  return Run(
      config, workdir, writer, mesh, parallel.axis_rules(config), train_data, eval_data, ckpt
  )


def compile_train_steps(
    run: Run,
    step_fns: dict,
    state_shardings,
    abstract_state,
    batch_spec,
    extra_args: tuple = (),
    extra_shardings: tuple = (),
):
  """Jits and compiles each of a trainer's step variants `step_fns` {key: (state, batch,
  *extra_args) -> (state, metrics)} with the state donated and sharded as state_shardings.

  Logs each program's memory and FLOPs. Returns ({key: compiled}, {key: flops.StepFlops per
  device}).
  """
  compiled, step_flops = {}, {}
  with parallel.tracing_context(run.mesh, run.rules):
    for key, step_fn in step_fns.items():
      jitted = jax.jit(
          step_fn,
          in_shardings=(state_shardings, run.batch_sharding, *extra_shardings),
          out_shardings=(state_shardings, None),
          donate_argnums=(0,),
      )
      compiled[key], step_flops[key] = compiling.compile_step(
          jitted, abstract_state, batch_spec, *extra_args
      )
  for key, program in compiled.items():
    name = "train step" if len(compiled) == 1 else f"train step ({key})"
    log.info(compiling.describe_memory(program, name))
    log.info(compiling.describe_flops(step_flops[key], name, run.peak_flops))
  return compiled, step_flops


def mean_metrics(history: list[dict]) -> dict[str, float]:
  """Host means of a list of per-step metric dicts of (device) scalars."""
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def check_finite(loss: float, step: int, last_checkpoint: int | None):
  """Stops a run whose loss is NaN/inf, naming the step and the checkpoint to go back to."""
  if not math.isfinite(loss):
    where = (
        f"the last good checkpoint is step {last_checkpoint}"
        if last_checkpoint is not None
        else "no checkpoint was written"
    )
    raise FloatingPointError(
        f"loss is {loss} at step {step}; stopping without saving ({where}). Lower "
        "optimizer.peak_lr or set optimizer.grad_clip_norm, then rerun to resume."
    )


def save_if_finite(ckpt, step: int, state, last_loss, last_checkpoint: int | None) -> int:
  """Saves `state` unless the last step's loss is NaN/inf (which stops the run instead)."""
  check_finite(float(jax.device_get(last_loss)), step, last_checkpoint)
  ckpt.save(step, state, force=True)
  return step


class TrainWindows:
  """Train-metric logging windows, each closed one step late.

  The steps' metrics stay on the device until their window closes. A window that ends at step
  N is fetched, NaN-checked and written once step N+1 has been dispatched (close_pending,
  called right after dispatching), so fetching never waits for the newest step and the
  device's queue never runs dry for a log line. The run's last window (the end, or a stop) is
  closed at once. `describe(step, scalars)` writes the trainer's log line.

  close_pending() returns whether it wrote a window: the loop then flushes its writer, so that
  each window reaches TensorBoard at its log step (vim_jax.infra.summaries writes event files
  on flush only; the run's last window lands with the final flush).
  """

  def __init__(self, writer, progress: Progress, describe):
    self.writer, self.progress, self.describe = writer, progress, describe
    self.history: list[dict] = []
    self.logged: list[dict[str, float]] = []  # each closed window's scalars, with 'step'
    self._pending = None  # (step, history, last_checkpoint, skipped_images)

  def add(self, metrics: dict):
    self.history.append(metrics)

  def end(self, step: int, last_checkpoint: int | None, skipped_images: int, at_once: bool):
    """Ends the window at `step`: closed now if at_once, else at the next close_pending."""
    self.close_pending()
    self._pending = (step, self.history, last_checkpoint, skipped_images)
    self.history = []
    if at_once:
      self.close_pending()

  def close_pending(self) -> bool:
    if self._pending is None:
      return False
    step, history, last_checkpoint, skipped_images = self._pending
    self._pending = None
    scalars = mean_metrics(history)
    check_finite(scalars["loss"], step, last_checkpoint)
    scalars.update(self.progress.update(step))
    scalars["data/skipped_images"] = skipped_images
    self.writer.write_scalars(
        step, {k if "/" in k else f"train/{k}": v for k, v in scalars.items()}
    )
    self.logged.append({"step": step, **scalars})
    self.describe(step, scalars)
    return True


def train(
    run: Run,
    state,
    latest: int | None,
    *,
    steps: dict,
    step_key: Callable[[int], Any],
    step_flops: dict,
    inputs: Callable[[dict], dict],
    extra_args: tuple = (),
    describe: Callable[[dict], str],
    evaluate: Callable[[int, Any, bool], dict | None],
    checkpoint_every: int,
    tokens_per_example: int = 0,
    mean_flops=None,
    should_stop: Callable[[int], bool] | None = None,
) -> RunResult:
  """Trains from state.step to config.total_steps; the one loop of every trainer.

  steps: the compiled step variants {key: (state, batch, *extra_args) -> (state, metrics)};
  step_key(step) picks the one that runs at `step` (the tokenizer's R1 step every
  r1_interval steps). inputs(local_batch) -> the arrays the steps take from this process's
  rows. describe(scalars) -> the trainer's part of the log line (losses, accuracy).
  evaluate(step, state, is_last) -> metrics of whatever evaluation is due at `step`, or None.
  mean_flops: a flops.StepFlops for the throughput log (default: step_flops of the variant
  that runs at step 0). should_stop(step) -> True makes the loop save after `step` and return
  (tests interrupt runs with it; SIGTERM does the same through infra.preemption).
  """
  config, writer = run.config, run.writer
  start_step = int(state.step)
  progress = Progress(
      start_step,
      config.total_steps,
      config.batch_size,
      mean_flops or step_flops[step_key(0)],
      run.mesh.size,
      tokens_per_example=tokens_per_example,
      peak_flops=run.peak_flops,
  )

  def log_line(step, scalars):
    log.info(
        "step %d/%d: %s, %s",
        step,
        config.total_steps,
        describe(scalars),
        progress.describe(step, scalars),
    )

  windows = TrainWindows(writer, progress, log_line)
  last_saved, eval_metrics = latest, None
  train_iter = run.train_data.iterate(start_step)
  step = start_step
  while step < config.total_steps:
    batch = parallel.global_batch_from_local(inputs(next(train_iter)), run.mesh, config.batch_size)
    state, metrics = steps[step_key(step)](state, batch, *extra_args)
    if windows.close_pending():  # the previous window, now that this step is queued
      writer.flush()  # events reach TensorBoard at each log step, not only at the end
    windows.add(metrics)
    step += 1
    is_last = step == config.total_steps
    asked = should_stop is not None and should_stop(step)
    stop_now = preemption.preemption_requested(step) or asked  # asked at every step

    if step % config.log_every == 0 or is_last or stop_now:
      windows.end(step, last_saved, run.train_data.skipped_images, at_once=is_last or stop_now)
    evaluated = evaluate(step, state, is_last)
    if evaluated is not None:
      eval_metrics = {**(eval_metrics or {}), **evaluated}  # FID-only steps keep the rest
      writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluated.items()})
    if step % checkpoint_every == 0 or is_last or stop_now:
      last_saved = save_if_finite(run.ckpt, step, state, metrics["loss"], last_saved)
    if stop_now:
      log.warning(
          "stop requested: saved step %d and stopping; rerun the same command to resume", step
      )
      break

  run.ckpt.close()
  writer.flush()
  train_iter.close()
  return RunResult(state, windows.logged, eval_metrics)
