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
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, parameter_overview
from jax.experimental import multihost_utils

from vim_jax import checkpoint, image_metrics, losses, optim, parallel, train_lib, visualize
from vim_jax.data import pipeline
from vim_jax.models import vitvqgan

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass
class RunResult:
  """What a call of train_and_evaluate leaves behind (besides the workdir)."""

  state: TrainState
  train_metrics: list[dict[str, float]]  # host means at each log point, with "step"
  eval_metrics: dict[str, float] | None  # the last evaluation


# ----------------------------------------------------------------------------------------------
# Model, optimizer and the pure step functions.
# ----------------------------------------------------------------------------------------------
def build_model(config: ml_collections.ConfigDict) -> vitvqgan.ViTVQGAN:
  return vitvqgan.ViTVQGAN.from_config(config)


def build_optimizer(config: ml_collections.ConfigDict):
  schedule = optim.warmup_cosine_schedule(config.optimizer, config.total_steps)
  return optim.adamw(config.optimizer, schedule), schedule


def make_init_fn(model: vitvqgan.ViTVQGAN, tx: optax.GradientTransformation, init_batch: int):
  """rng -> TrainState whose params carry logical-axis boxes (unbox after sharding)."""

  def init(rng):
    images = jnp.zeros((init_batch, model.image_size, model.image_size, 3), jnp.float32)
    params = model.init(rng, images)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def make_train_step(model, tx, schedule, config) -> Callable:
  """(state, batch) -> (state, metrics); batch['image']: [B, S, S, 3] in [-1, 1]."""
  weights = config.loss.to_dict()
  base_rng = jax.random.key(config.seed)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    images = batch["image"]

    def loss_fn(params):
      outputs = model.apply({"params": params}, images, deterministic=False,
                            rngs={"dropout": rng})
      terms = losses.reconstruction_terms(outputs, images, model.logit_laplace_eps)
      return losses.weighted_total(terms, weights), (terms, outputs)

    (total, (terms, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": total,
        **{f"loss_{name}": value for name, value in terms.items()},
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": schedule(state.step),
        "codebook_usage": outputs["codebook_usage"],
        "perplexity": outputs["perplexity"],
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model) -> Callable:
  """(params, batch) -> per-image metrics [B], indices [B, h, w], reconstructions."""

  def eval_step(params, batch):
    images = batch["image"]
    outputs = model.apply({"params": params}, images)
    recon = outputs["reconstruction"]
    diff = recon.astype(jnp.float32) - images
    return {
        "psnr": image_metrics.psnr(images, recon),
        "ssim": image_metrics.ssim(images, recon),
        "l1": jnp.mean(jnp.abs(diff), axis=(1, 2, 3)),
        "l2": jnp.mean(jnp.square(diff), axis=(1, 2, 3)),
        "indices": outputs["indices"],
        "reconstruction": recon,
    }

  return eval_step


# ----------------------------------------------------------------------------------------------
# Evaluation over the whole held-out split.
# ----------------------------------------------------------------------------------------------
def usage_per_chunk(indices: np.ndarray, codebook_size: int, chunk: int) -> float:
  """The paper's usage: % of codes used by each `chunk` images, averaged over full chunks
  (all images as one chunk when there are fewer than `chunk`). indices: [N, h, w]."""
  n = indices.shape[0]
  starts = range(0, max(n - chunk + 1, 1), chunk)
  used = [np.unique(indices[s:s + chunk]).size / codebook_size for s in starts]
  return float(np.mean(used))


def evaluate(eval_fn, params, eval_pipeline: pipeline.InputPipeline, mesh,
             codebook_size: int, usage_chunk: int = 256):
  """Runs one pass over the eval split.

  Returns (metrics dict, (images, reconstructions) of the first batch for image grids).
  """
  sums: dict[str, float] = {}
  all_indices, first = [], None
  count = 0
  for local in eval_pipeline.iterate():
    batch = parallel.global_batch_from_local({"image": local["image"]}, mesh)
    out = eval_fn(params, batch)
    mask = multihost_utils.process_allgather(local["mask"], tiled=True).astype(bool)
    if first is None:  # only the first batch's images travel to the host, for the grids
      images, recons = multihost_utils.process_allgather(
          (batch["image"], out["reconstruction"]), tiled=True)
      first = (np.asarray(images)[mask], np.asarray(recons)[mask])
    out = multihost_utils.process_allgather(
        {k: out[k] for k in ("psnr", "ssim", "l1", "l2", "indices")}, tiled=True)
    for key in ("psnr", "ssim", "l1", "l2"):
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(out[key], np.float64)[mask]))
    all_indices.append(np.asarray(out["indices"])[mask])
    count += int(mask.sum())
  indices = np.concatenate(all_indices)
  counts = np.bincount(indices.reshape(-1), minlength=codebook_size)
  probs = counts / counts.sum()
  nz = probs[probs > 0]
  metrics = {k: v / count for k, v in sums.items()}
  metrics.update({
      "codebook_usage": float(np.mean(counts > 0)),
      f"codebook_usage_per_{usage_chunk}": usage_per_chunk(indices, codebook_size, usage_chunk),
      "perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
      "num_images": count,
  })
  return metrics, first


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
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  log.info("devices: %d x %s, processes: %d", len(devices or jax.devices()),
           jax.devices()[0].platform, jax.process_count())

  # --- Mesh -----------------------------------------------------------------------------------
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.axis_rules(config)
  dp = parallel.data_parallel_size(mesh)
  log.info("mesh: %s", dict(mesh.shape))
  for name, size in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
    if size % dp:
      raise ValueError(f"config.{name}={size} is not divisible by the data-parallel size {dp} "
                       f"(mesh {dict(mesh.shape)}); use a multiple of {dp}.")

  # --- Input ----------------------------------------------------------------------------------
  train_data, eval_data = pipeline.build_pipelines(config, jax.process_index(),
                                                   jax.process_count())
  log.info("data: %s, %d train / %d eval examples, %d classes", config.data.source,
           train_data.num_examples, eval_data.num_examples, train_data.num_classes)

  # --- Model and optimizer --------------------------------------------------------------------
  model = build_model(config)
  tx, schedule = build_optimizer(config)
  init_fn = make_init_fn(model, tx, init_batch=dp)

  # --- Sharded state: fresh or resumed ----------------------------------------------------------
  with parallel.tracing_context(mesh, rules):
    boxed_shapes = jax.eval_shape(init_fn, jax.random.key(config.seed))
  state_shardings = parallel.logical_shardings(boxed_shapes, mesh, rules)
  state_shapes = nn.meta.unbox(boxed_shapes)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    with parallel.tracing_context(mesh, rules):
      state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=state_shardings)(
          jax.random.key(config.seed))
  else:
    state = ckpt.restore(latest, checkpoint.abstract_with_shardings(state_shapes,
                                                                    state_shardings))
  start_step = int(state.step)
  log.info("%s at step %d", "starting" if latest is None else "resumed", start_step)
  counts = vitvqgan.count_params_by_stack(state.params)
  log.info("parameters: %s (total %.2fM)", {k: f"{v / 1e6:.2f}M" for k, v in counts.items()},
           sum(counts.values()) / 1e6)
  if is_main:
    parameter_overview.log_parameter_overview(state.params)

  # --- Compiled steps ---------------------------------------------------------------------------
  batch_sharding = parallel.batch_sharding(mesh)
  image_spec = lambda b: {"image": jax.ShapeDtypeStruct(
      (b, config.image_size, config.image_size, 3), jnp.float32, sharding=batch_sharding)}
  abstract_state = checkpoint.abstract_with_shardings(state_shapes, state_shardings)
  train_step = jax.jit(make_train_step(model, tx, schedule, config),
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings.params, batch_sharding))
  with parallel.tracing_context(mesh, rules):
    train_step, flops_per_step = train_lib.compile_step(train_step, abstract_state,
                                                        image_spec(config.batch_size))
    eval_step, _ = train_lib.compile_step(eval_step, abstract_state.params,
                                          image_spec(config.eval_batch_size))
  log.info(train_lib.describe_memory(train_step, "train step"))
  log.info("train step: %.3f GFLOP per device per step (XLA cost analysis)", flops_per_step / 1e9)

  def run_eval(step: int):
    metrics, (images, recons) = evaluate(eval_step, state.params, eval_data, mesh,
                                         model.codebook_size, config.eval_usage_chunk)
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
                                mesh.size)
  last_saved = latest
  history: list[dict] = []
  logged: list[dict[str, float]] = []
  eval_metrics = None
  train_iter = train_data.iterate(start_step)
  step = start_step
  while step < config.total_steps:
    local = next(train_iter)
    batch = parallel.global_batch_from_local({"image": local["image"]}, mesh)
    state, metrics = train_step(state, batch)
    history.append(metrics)
    step += 1
    is_last = step == config.total_steps
    stop_now = should_stop is not None and should_stop(step)

    if step % config.log_every == 0 or is_last or stop_now:
      scalars = train_lib.mean_metrics(history)
      history = []
      train_lib.check_finite(scalars["loss"], step, last_saved)
      scalars.update(progress.update(step))
      scalars["data/skipped_images"] = train_data.skipped_images
      logged.append({"step": step, **scalars})
      writer.write_scalars(step, {k if "/" in k else f"train/{k}": v for k, v in scalars.items()})
      log.info("step %d/%d: loss %.4f, l2 %.4g, usage %.3f, %.2f steps/s, "
               "%.1f img/s/device, %.3f TFLOP/s/device, ETA %s", step, config.total_steps,
               scalars["loss"], scalars["loss_l2"], scalars["codebook_usage"],
               scalars["steps_per_sec"], scalars["images_per_sec_per_device"],
               scalars["tflops_per_sec_per_device"],
               train_lib.format_duration(progress.eta_seconds(step)))

    if step % config.eval_every == 0 or is_last:
      eval_metrics = run_eval(step)

    if step % config.checkpoint_every == 0 or is_last or stop_now:
      loss = float(jax.device_get(metrics["loss"]))
      train_lib.check_finite(loss, step, last_saved)
      ckpt.save(step, state, force=True)
      last_saved = step
    if stop_now:
      log.info("stop requested: saved step %d, exiting the loop", step)
      break

  ckpt.close()
  writer.flush()
  train_iter.close()
  return RunResult(state, logged, eval_metrics)


def summarize_for_tests(state: TrainState) -> dict[str, np.ndarray]:
  """Flat host copy of the params, for equality checks across runs and meshes."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}

