"""Stage-2 trainer: VIM, the autoregressive Transformer over a frozen tokenizer's tokens.

`train_and_evaluate(config, workdir)` reads top to bottom like the stage-1 trainer: logging,
mesh, input, the frozen tokenizer, VIM and its optimizer, sharded state (fresh or resumed),
compiled steps, then the loop. Images are augmented by the input pipeline and tokenized inside
the sharded train step (the paper's way), so no pre-tokenized copy of the data is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.evaluators import fid, paper_metrics
from vim_jax.infra import checkpoint, flops, parallel, runs, visualize
from vim_jax.trainers import microbatch, train_lib
from vim_jax.data import pipeline
from vim_jax.models import inception
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.trainers.vim_step import (build_model, build_optimizer, evaluate, make_eval_step,
                            make_sample_fn, make_train_step, model_inputs, sampling_config_from)

log = logging.getLogger(__name__)


TrainState = train_lib.TrainState


@dataclasses.dataclass
class RunResult:
  state: TrainState
  train_metrics: list[dict[str, float]]
  eval_metrics: dict[str, float] | None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       should_stop: Callable[[int], bool] | None = None,
                       devices: list[jax.Device] | None = None) -> RunResult:
  """Trains VIM for config.total_steps on a frozen tokenizer, resuming from workdir."""
  # --- Logging --------------------------------------------------------------------------------
  is_main = jax.process_index() == 0
  writer = train_lib.open_workdir(workdir, config)
  if config.fid.every > 0:  # a missing Inception file fails now, not after minutes of compiling
    inception.check_weights(config.fid.inception_weights)

  # --- Mesh -----------------------------------------------------------------------------------
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.axis_rules(config)
  replicated = NamedSharding(mesh, P())
  log.info("mesh: %s", dict(mesh.shape))
  train_lib.check_divisible(mesh, batch_size=config.batch_size,
                            eval_batch_size=config.eval_batch_size)
  microbatch.check(config, parallel.data_parallel_size(mesh))

  # --- Input ----------------------------------------------------------------------------------
  train_data, eval_data = pipeline.build_pipelines(config, mesh)
  if config.model.num_classes and config.model.num_classes != train_data.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the dataset has "
                     f"{train_data.num_classes} classes; set them equal (0 = unconditional).")

  # --- Frozen tokenizer, model and optimizer --------------------------------------------------
  if not config.tokenizer_workdir:
    raise ValueError("config.tokenizer_workdir is empty; point it at a stage-1 workdir, e.g. "
                     "--config.tokenizer_workdir=workdirs/vitvq_base")
  # The train and eval steps hold only the encoder and the codebook, sharded like the VIM's
  # params; the decoder is loaded (replicated) for the sample grids and FID samples alone.
  tok = runs.load_frozen_encoder(config.tokenizer_workdir, mesh, rules)
  decoder_params = runs.load_tokenizer(config.tokenizer_workdir, shardings=replicated,
                                       with_encoder=False).params
  log.info("tokenizer: %s step %d, %d tokens per image, codebook %d", config.tokenizer_workdir,
           tok.step, tok.num_tokens, tok.model.codebook_size)
  model = build_model(config, tok.model)
  tx, schedule = build_optimizer(config)

  def init_fn(rng):
    n = parallel.data_parallel_size(mesh)
    params = model.init(rng, jnp.zeros((n, tok.num_tokens), jnp.int32),
                        jnp.zeros((n,), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # --- Sharded state: fresh or resumed ----------------------------------------------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  state, state_shardings, abstract_state, latest = train_lib.create_or_restore_state(
      init_fn, config.seed, mesh, rules, ckpt)
  start_step = int(state.step)
  num_params = tokenizer_lib.count_params(state.params)
  log.info("VIM parameters: %.2fM", num_params / 1e6)
  if is_main:
    train_lib.log_parameter_overview(state.params)

  # --- Compiled steps ---------------------------------------------------------------------------
  batch_sharding = parallel.batch_sharding(mesh)
  def batch_spec(b):
    spec = {"label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
    if config.data.source == "tokens":
      spec["tokens"] = jax.ShapeDtypeStruct((b, tok.num_tokens), jnp.int32,
                                            sharding=batch_sharding)
    else:
      spec["image"] = jax.ShapeDtypeStruct((b, config.image_size, config.image_size, 3),
                                           jnp.float32, sharding=batch_sharding)
    return spec
  tok_shardings = jax.tree.map(lambda x: x.sharding, tok.params)
  train_step = jax.jit(make_train_step(model, tok.model, tx, schedule, config,
                                       parallel.data_parallel_size(mesh)),
                       in_shardings=(state_shardings, batch_sharding, tok_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, tok.model),
                      in_shardings=(state_shardings.params, batch_sharding, tok_shardings))
  sample_fn = jax.jit(make_sample_fn(model, tok.model, sampling_config_from(config)),
                      in_shardings=(state_shardings.params, replicated, batch_sharding, None))
  with parallel.tracing_context(mesh, rules):
    train_step, flops_per_step = train_lib.compile_step(
        train_step, abstract_state, batch_spec(config.batch_size), tok.params)
    eval_step, _ = train_lib.compile_step(eval_step, abstract_state.params,
                                          batch_spec(config.eval_batch_size), tok.params)
  peak = flops.peak_flops_per_second(mesh.devices.flat[0])
  log.info(train_lib.describe_memory(train_step, "train step"))
  log.info(train_lib.describe_flops(flops_per_step, "train step (with tokenization)", peak))

  def run_eval(step: int):
    metrics = evaluate(eval_step, state.params, tok.params, eval_data, mesh)
    log.info("eval at step %d on %d images: %s", step, metrics["num_images"],
             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    n = config.num_grid_images
    # Drawn in a batch rounded up to the data-parallel size (16 grid images on 64 chips).
    dp = parallel.data_parallel_size(mesh)
    labels = np.arange(-(-n // dp) * dp, dtype=np.int32) % max(model.num_classes, 1)
    with parallel.tracing_context(mesh, rules):
      images = sample_fn(state.params, decoder_params,
                         jax.device_put(labels, batch_sharding), jax.random.key(step))
    images = parallel.fetch(images)[:n]
    grid = visualize.tile(visualize.preprocess.to_uint8(images), columns=max(model.num_classes, 4))
    writer.write_images(step, {"samples": grid[None]})
    if is_main:
      visualize.save_png(grid, os.path.join(workdir, "images", f"samples_{step:08d}.png"))
    return metrics

  # gFID / IS of fid.num_images class-balanced samples every fid.every steps, against the
  # eval split's statistics (computed here, once) or fid.reference_stats.
  extractor = reference = None
  if config.fid.every > 0:
    extractor = fid.FeatureExtractor(config.fid.inception_weights, resize=config.fid.resize,
                                     batch_size=config.fid.batch_size)
    reference = paper_metrics.reference_stats(config, extractor, config.fid.reference_stats)
    reference_label = paper_metrics.reference_label_for(config.fid.reference_stats, config,
                                                     reference)

  def sample_batches(step: int, num: int):
    """uint8 sample batches [<= eval_batch_size, S, S, 3], class-balanced."""
    labels = np.resize(np.arange(max(model.num_classes, 1), dtype=np.int32), num)
    b = config.eval_batch_size
    for i, start in enumerate(range(0, num, b)):
      chunk = np.resize(labels[start:start + b], b)
      with parallel.tracing_context(mesh, rules):
        images = sample_fn(state.params, decoder_params, jax.device_put(chunk, batch_sharding),
                           jax.random.fold_in(jax.random.key(step), i))
      images = parallel.fetch(images)
      yield visualize.preprocess.to_uint8(images)[:min(b, num - start)]

  def run_fid(step: int):
    feats = extractor.extract(sample_batches(step, config.fid.num_images), "samples",
                              config.fid.num_images)
    against = f"{reference.description} ({reference.num_images or '?'} images)"
    results = paper_metrics.generator_metrics(feats, reference, reference_label, against, "")
    log.info("FID at step %d: %s", step, ", ".join(f"{k}={v['value']:.4g}"
                                                   for k, v in results.items()))
    writer.write_scalars(step, {f"eval/{k}": v["value"] for k, v in results.items()})
    return {k: v["value"] for k, v in results.items()}

  # --- Loop -------------------------------------------------------------------------------------
  progress = train_lib.Progress(start_step, config.total_steps, config.batch_size, flops_per_step,
                                mesh.size, tokens_per_example=tok.num_tokens, peak_flops=peak)

  def describe(step, scalars):
    log.info("step %d/%d: loss %.4f (%.3f bits/token), accuracy %.3f, %.2f steps/s, "
             "%.0f tokens/s/device, %.3f model TFLOP/s/device%s, ETA %s", step,
             config.total_steps, scalars["loss"], scalars["bits_per_token"],
             scalars["accuracy"], scalars["steps_per_sec"], scalars["tokens_per_sec_per_device"],
             scalars["tflops_per_sec_per_device"], progress.utilisation(scalars),
             train_lib.format_duration(progress.eta_seconds(step)))

  windows = train_lib.TrainWindows(writer, progress, describe)
  last_saved, eval_metrics = latest, None
  train_iter = train_data.iterate(start_step)
  step = start_step
  while step < config.total_steps:
    local = next(train_iter)
    batch = parallel.global_batch_from_local(model_inputs(local), mesh, config.batch_size)
    state, metrics = train_step(state, batch, tok.params)
    if windows.close_pending():  # the previous window, now that this step is queued
      writer.flush()  # events reach TensorBoard at each log step, not only at the end
    windows.add(metrics)
    step += 1
    is_last = step == config.total_steps
    stop_now = ((should_stop is not None and should_stop(step))
                or train_lib.preemption_requested(step))

    if step % config.log_every == 0 or is_last or stop_now:
      windows.end(step, last_saved, train_data.skipped_images, at_once=is_last or stop_now)

    if step % config.eval_every == 0 or is_last:
      eval_metrics = run_eval(step)
    if extractor is not None and (step % config.fid.every == 0 or is_last):
      eval_metrics = {**(eval_metrics or {}), **run_fid(step)}

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
