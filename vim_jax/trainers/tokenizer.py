"""Stage-1 trainer: the ViT-VQGAN image tokenizer.

`train_and_evaluate(config, workdir)` reads top to bottom: start-up (workdir, mesh, input),
models and optimizers, sharded state (fresh or resumed), compiled steps, the evaluation, then
the shared loop (trainers/loop.py). The same code runs on a 2-core CPU and on a TPU pod; only
config.mesh and config.axis_rules change the layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import flax
import jax
import ml_collections
import numpy as np

from vim_jax.evaluators import fid, paper_metrics
from vim_jax.infra import flops, parallel, visualize
from vim_jax.models import lpips as lpips_lib
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.trainers import compiling, loop, microbatch, tokenizer_step, train_state

log = logging.getLogger(__name__)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    should_stop: Callable[[int], bool] | None = None,
    devices: list[jax.Device] | None = None,
) -> loop.RunResult:
  """Trains stage 1 for config.total_steps, resuming from workdir's latest checkpoint.

  should_stop(step) -> True makes the loop save a checkpoint after `step` and return early
  (preemption; tests interrupt runs with it). devices: the mesh's devices (default: all).
  """
  run = loop.start(config, workdir, devices)
  microbatch.check(config, run.data_parallel)  # grad_accum_steps against the mesh

  # --- Models, optimizers and state -------------------------------------------------------------
  models = tokenizer_step.build_models(config)
  tx, schedule, disc_tx = tokenizer_step.build_optimizers(config)
  init_fn = tokenizer_step.make_init_fn(models, tx, disc_tx, config, run.data_parallel)
  lpips_params = {}
  if models.lpips is not None:  # frozen, replicated, passed to the steps as an argument
    lpips_params = jax.device_put(
        lpips_lib.load_params(config.perceptual_weights)["params"], run.replicated
    )
    log.info("LPIPS weights: %s", config.perceptual_weights)
  state, state_shardings, abstract_state, latest = train_state.create_or_restore_state(
      init_fn, config.seed, run.mesh, run.rules, run.ckpt
  )
  counts = tokenizer_lib.count_params_by_stack(state.params)
  if state.disc_params is not None:
    counts["discriminator"] = tokenizer_lib.count_params(state.disc_params)
  log.info(
      "parameters: %s (total %.2fM)",
      {k: f"{v / 1e6:.2f}M" for k, v in counts.items()},
      sum(counts.values()) / 1e6,
  )
  if run.is_main:
    train_state.log_parameter_overview(state.params)

  # --- Compiled steps -----------------------------------------------------------------------------
  # The regular step and, with lazy R1, the R1 step run every r1_interval steps: two programs,
  # so the regular one holds nothing for R1 (tokenizer_step.make_train_step).
  step_fns = tokenizer_step.make_train_steps(
      models, tx, schedule, disc_tx, config, run.data_parallel
  )
  train_steps, step_flops = loop.compile_train_steps(
      run,
      {("R1" if with_r1 else "regular"): fn for with_r1, fn in step_fns.items()},
      state_shardings,
      abstract_state,
      tokenizer_step.batch_spec(config, config.batch_size, run.batch_sharding),
      (lpips_params,),
      (run.replicated,),
  )
  mean_flops = step_flops["regular"]
  if "R1" in step_flops:  # R1 at its real frequency
    mean_flops = flops.mean_over_cycle(
        step_flops["regular"], step_flops["R1"], tokenizer_step.r1_interval(config)
    )
  with parallel.tracing_context(run.mesh, run.rules):
    eval_step = jax.jit(
        tokenizer_step.make_eval_step(models),
        in_shardings=(state_shardings.params, run.batch_sharding, run.replicated),
    )
    eval_step, _ = compiling.compile_step(
        eval_step,
        abstract_state.params,
        tokenizer_step.batch_spec(config, config.eval_batch_size, run.batch_sharding),
        lpips_params,
    )

  # --- Evaluation ---------------------------------------------------------------------------------
  # rFID / IS in the eval pass every fid.every steps; the real images' statistics are computed
  # at the first one and kept for the run.
  extractor = real_stats = None
  if config.fid.every > 0:
    extractor = fid.FeatureExtractor(
        config.fid.inception_weights, resize=config.fid.resize, batch_size=config.fid.batch_size
    )
  fid_label = paper_metrics.data_label(config.data) if extractor else ""

  def evaluate(step: int, state, is_last: bool) -> dict | None:
    nonlocal real_stats
    with_fid = extractor is not None and (step % config.fid.every == 0 or is_last)
    if not (step % config.eval_every == 0 or is_last or with_fid):
      return None
    eval_params = state.ema_params if state.ema_params is not None else state.params
    consumer = (
        paper_metrics.ReconstructionFID(extractor, fid_label, real_stats) if with_fid else None
    )
    metrics, (images, recons) = tokenizer_step.evaluate(
        eval_step,
        eval_params,
        lpips_params,
        run.eval_data,
        run.mesh,
        models.tokenizer.codebook_size,
        config.eval_usage_chunk,
        consume=consumer,
    )
    if consumer is not None:
      metrics.update({k: v["value"] for k, v in consumer.results().items()})
      real_stats = consumer.real_stats()
    log.info(
        "eval at step %d on %d images: %s",
        step,
        metrics["num_images"],
        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
    )
    grid = visualize.pairs_grid(images[: config.num_grid_images], recons[: config.num_grid_images])
    run.writer.write_images(step, {"eval/inputs_and_reconstructions": grid[None]})
    if run.is_main:
      visualize.save_png(grid, os.path.join(workdir, "images", f"reconstructions_{step:08d}.png"))
    return metrics

  # --- The loop -----------------------------------------------------------------------------------
  def describe(scalars) -> str:
    return (
        f"loss {scalars['loss']:.4f}, l2 {scalars['loss_l2']:.4g}, "
        f"usage {scalars['codebook_usage']:.3f}"
    )

  return loop.train(
      run,
      state,
      latest,
      steps=train_steps,
      step_key=lambda step: "R1" if tokenizer_step.is_r1_step(config, step) else "regular",
      step_flops=step_flops,
      mean_flops=mean_flops,
      extra_args=(lpips_params,),
      inputs=lambda local: {"image": local["image"]},
      describe=describe,
      evaluate=evaluate,
      checkpoint_every=config.checkpoint_every,
      should_stop=should_stop,
  )


def summarize_for_tests(state: train_state.TrainState) -> dict[str, np.ndarray]:
  """Flat host copy of the params, for equality checks across runs and meshes."""
  flat = flax.traverse_util.flatten_dict(parallel.fetch(state.params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}
