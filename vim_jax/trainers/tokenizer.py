"""Stage-1 trainer: the ViT-VQGAN image tokenizer.

`train_and_evaluate(config, workdir)` reads top to bottom: logging, mesh, input, model and
optimizer, sharded state (fresh or resumed), compiled steps, then the loop that trains, logs,
evaluates and checkpoints. The same code runs on a 2-core CPU and on a TPU pod; only
config.mesh and config.axis_rules change the layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.evaluators import fid, paper_metrics
from vim_jax.infra import checkpoint, flops, parallel, visualize
from vim_jax.trainers import microbatch, train_lib
from vim_jax.data import pipeline
from vim_jax.models import inception
from vim_jax.models import lpips as lpips_lib
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.trainers.tokenizer_step import (TrainState, build_models, build_optimizers, evaluate, is_r1_step,
                            make_eval_step, make_init_fn, make_train_steps, r1_interval)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
  """What a call of train_and_evaluate leaves behind (besides the workdir)."""

  state: TrainState
  train_metrics: list[dict[str, float]]  # host means at each log point, with "step"
  eval_metrics: dict[str, float] | None  # the last evaluation


# ----------------------------------------------------------------------------------------------
# The main loop.
# ----------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       should_stop: Callable[[int], bool] | None = None,
                       devices: list[jax.Device] | None = None) -> RunResult:
  """Trains stage 1 for config.total_steps, resuming from workdir's latest checkpoint.

  should_stop(step) -> True makes the loop save a checkpoint after `step` and return early
  (preemption; tests interrupt runs with it). devices: the mesh's devices (default: all).
  """
  # --- Logging --------------------------------------------------------------------------------
  is_main = jax.process_index() == 0
  writer = train_lib.open_workdir(workdir, config)
  if config.fid.every > 0:  # a missing Inception file fails now, not after minutes of compiling
    inception.check_weights(config.fid.inception_weights)
  log.info("devices: %d x %s, processes: %d", len(devices or jax.devices()),
           jax.devices()[0].platform, jax.process_count())

  # --- Mesh -----------------------------------------------------------------------------------
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.axis_rules(config)
  log.info("mesh: %s", dict(mesh.shape))
  train_lib.check_divisible(mesh, batch_size=config.batch_size,
                            eval_batch_size=config.eval_batch_size)
  microbatch.check(config, parallel.data_parallel_size(mesh))

  # --- Input ----------------------------------------------------------------------------------
  train_data, eval_data = pipeline.build_pipelines(config, mesh)
  log.info("data: %s, %d train / %d eval examples, %d classes", config.data.source,
           train_data.num_examples, eval_data.num_examples, train_data.num_classes)

  # --- Models and optimizers ------------------------------------------------------------------
  models = build_models(config)
  tx, schedule, disc_tx = build_optimizers(config)
  init_fn = make_init_fn(models, tx, disc_tx, config,
                         init_batch=parallel.data_parallel_size(mesh))
  replicated = NamedSharding(mesh, P())
  lpips_params = {}
  if models.lpips is not None:  # frozen, replicated, passed to the steps as an argument
    lpips_params = jax.device_put(lpips_lib.load_params(config.perceptual_weights)["params"],
                                  replicated)
    log.info("LPIPS weights: %s", config.perceptual_weights)

  # --- Sharded state: fresh or resumed ----------------------------------------------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  state, state_shardings, abstract_state, latest = train_lib.create_or_restore_state(
      init_fn, config.seed, mesh, rules, ckpt)
  start_step = int(state.step)
  counts = tokenizer_lib.count_params_by_stack(state.params)
  if state.disc_params is not None:
    counts["discriminator"] = tokenizer_lib.count_params(state.disc_params)
  log.info("parameters: %s (total %.2fM)", {k: f"{v / 1e6:.2f}M" for k, v in counts.items()},
           sum(counts.values()) / 1e6)
  if is_main:
    train_lib.log_parameter_overview(state.params)

  # --- Compiled steps ---------------------------------------------------------------------------
  batch_sharding = parallel.batch_sharding(mesh)
  image_spec = lambda b: {"image": jax.ShapeDtypeStruct(
      (b, config.image_size, config.image_size, 3), jnp.float32, sharding=batch_sharding)}
  # The regular step and, with lazy R1, the R1 step run every r1_interval steps: two programs,
  # so the regular one holds nothing for R1 (tokenizer_step.make_train_step).
  train_steps, step_flops = {}, {}
  eval_step = jax.jit(make_eval_step(models),
                      in_shardings=(state_shardings.params, batch_sharding, replicated))
  with parallel.tracing_context(mesh, rules):
    for with_r1, step_fn in make_train_steps(models, tx, schedule, disc_tx, config,
                                             parallel.data_parallel_size(mesh)).items():
      jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
      train_steps[with_r1], step_flops[with_r1] = train_lib.compile_step(
          jitted, abstract_state, image_spec(config.batch_size), lpips_params)
    eval_step, _ = train_lib.compile_step(eval_step, abstract_state.params,
                                          image_spec(config.eval_batch_size), lpips_params)
  peak = flops.peak_flops_per_second(mesh.devices.flat[0])
  for with_r1, compiled in train_steps.items():
    name = "train step with R1" if with_r1 else "train step"
    log.info(train_lib.describe_memory(compiled, name))
    log.info(train_lib.describe_flops(step_flops[with_r1], name, peak))
  flops_per_step = step_flops[False]
  if True in step_flops:  # R1 at its real frequency
    flops_per_step = flops.mean_over_cycle(step_flops[False], step_flops[True],
                                           r1_interval(config))

  # rFID / IS in the eval pass every fid.every steps; the real images' statistics are computed
  # at the first one and kept for the run.
  extractor = real_stats = None
  if config.fid.every > 0:
    extractor = fid.FeatureExtractor(config.fid.inception_weights, resize=config.fid.resize,
                                     batch_size=config.fid.batch_size)
  fid_label = paper_metrics.data_label(config.data) if extractor else ""

  def run_eval(step: int, with_fid: bool):
    nonlocal real_stats
    eval_params = state.ema_params if state.ema_params is not None else state.params
    consumer = paper_metrics.ReconstructionFID(extractor, fid_label, real_stats) if with_fid else None
    metrics, (images, recons) = evaluate(eval_step, eval_params, lpips_params, eval_data, mesh,
                                         models.tokenizer.codebook_size, config.eval_usage_chunk,
                                         consume=consumer)
    if consumer is not None:
      metrics.update({k: v["value"] for k, v in consumer.results().items()})
      real_stats = consumer.real_stats()
    log.info("eval at step %d on %d images: %s", step, metrics["num_images"],
             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    grid = visualize.pairs_grid(images[:config.num_grid_images], recons[:config.num_grid_images])
    writer.write_images(step, {"eval/inputs_and_reconstructions": grid[None]})
    if is_main:
      visualize.save_png(grid, os.path.join(workdir, "images", f"reconstructions_{step:08d}.png"))
    return metrics

  # --- Loop -------------------------------------------------------------------------------------
  progress = train_lib.Progress(start_step, config.total_steps, config.batch_size, flops_per_step,
                                mesh.size, peak_flops=peak)

  def describe(step, scalars):
    log.info("step %d/%d: loss %.4f, l2 %.4g, usage %.3f, %.2f steps/s, "
             "%.1f img/s/device, %.3f model TFLOP/s/device%s, ETA %s", step, config.total_steps,
             scalars["loss"], scalars["loss_l2"], scalars["codebook_usage"],
             scalars["steps_per_sec"], scalars["images_per_sec_per_device"],
             scalars["tflops_per_sec_per_device"], progress.utilisation(scalars),
             train_lib.format_duration(progress.eta_seconds(step)))

  windows = train_lib.TrainWindows(writer, progress, describe)
  last_saved = latest
  eval_metrics = None
  train_iter = train_data.iterate(start_step)
  step = start_step
  while step < config.total_steps:
    local = next(train_iter)
    batch = parallel.global_batch_from_local({"image": local["image"]}, mesh, config.batch_size)
    state, metrics = train_steps[is_r1_step(config, step)](state, batch, lpips_params)
    if windows.close_pending():  # the previous window, now that this step is queued
      writer.flush()  # events reach TensorBoard at each log step, not only at the end
    windows.add(metrics)
    step += 1
    is_last = step == config.total_steps
    stop_now = ((should_stop is not None and should_stop(step))
                or train_lib.preemption_requested(step))

    if step % config.log_every == 0 or is_last or stop_now:
      windows.end(step, last_saved, train_data.skipped_images, at_once=is_last or stop_now)

    fid_due = extractor is not None and (step % config.fid.every == 0 or is_last)
    if step % config.eval_every == 0 or is_last or fid_due:
      eval_metrics = run_eval(step, fid_due)

    if step % config.checkpoint_every == 0 or is_last or stop_now:
      last_saved = train_lib.save_if_finite(ckpt, step, state, metrics["loss"], last_saved)
    if stop_now:
      log.warning("stop requested: saved step %d and stopping; rerun the same command to "
                  "resume", step)
      break

  ckpt.close()
  writer.flush()
  train_iter.close()
  return RunResult(state, windows.logged, eval_metrics)


def summarize_for_tests(state: TrainState) -> dict[str, np.ndarray]:
  """Flat host copy of the params, for equality checks across runs and meshes."""
  flat = flax.traverse_util.flatten_dict(parallel.fetch(state.params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}

