"""Stage-2 trainer: VIM, the autoregressive Transformer over a frozen tokenizer's tokens.

`train_and_evaluate(config, workdir)` reads top to bottom like the stage-1 trainer: logging,
mesh, input, the frozen tokenizer, VIM and its optimizer, sharded state (fresh or resumed),
compiled steps, then the loop. Images are augmented by the input pipeline and tokenized inside
the sharded train step (the paper's way), so no pre-tokenized copy of the data is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax import (checkpoint, evaluators, fid, optim, parallel, sampling, tokenizer, train_lib,
                     visualize)
from vim_jax.data import pipeline
from vim_jax.models import vim as vim_lib
from vim_jax.models import vitvqgan

log = logging.getLogger(__name__)


TrainState = train_lib.TrainState


@dataclasses.dataclass
class RunResult:
  state: TrainState
  train_metrics: list[dict[str, float]]
  eval_metrics: dict[str, float] | None


def build_model(config, tok: tokenizer.Tokenizer) -> vim_lib.VIM:
  if config.image_size != tok.model.image_size:
    raise ValueError(f"config.image_size={config.image_size} but the tokenizer at "
                     f"{config.tokenizer_workdir} was trained at {tok.model.image_size}; set "
                     f"--config.image_size={tok.model.image_size}.")
  return vim_lib.VIM.from_config(config, tok.model.codebook_size, tok.num_tokens)


def build_optimizer(config):
  schedule = optim.warmup_exponential_schedule(config.optimizer, config.total_steps)
  return optim.adamw(config.optimizer, schedule), schedule


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example mean CE (nats) and accuracy: logits [B, N, V], targets int [B, N] -> [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  accuracy = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.mean(nll, axis=-1), jnp.mean(accuracy, axis=-1)


def batch_tokens(batch, tok_model: vitvqgan.ViTVQGAN, tokenizer_params) -> jax.Array:
  """int32 [B, N] tokens: pre-tokenized ones, or the frozen tokenizer's for batch['image']."""
  if "tokens" in batch:
    return batch["tokens"]
  tokens = tok_model.apply({"params": tokenizer_params}, batch["image"],
                           method=vitvqgan.ViTVQGAN.encode_to_indices)
  return jax.lax.stop_gradient(tokens.reshape(tokens.shape[0], -1))


def make_train_step(model: vim_lib.VIM, tok_model: vitvqgan.ViTVQGAN, tx, schedule,
                    config) -> Callable:
  """(state, batch, tokenizer_params) -> (state, metrics).

  batch: image [B, S, S, 3] in [-1, 1] (or tokens int [B, N]), label int [B].
  """
  base_rng = jax.random.key(config.seed)

  def train_step(state: TrainState, batch, tokenizer_params):
    rng = jax.random.fold_in(base_rng, state.step)
    drop_rng, dropout_rng = jax.random.split(rng)
    tokens = batch_tokens(batch, tok_model, tokenizer_params)
    labels = batch["label"]
    if model.num_classes and config.label_dropout > 0:  # for classifier-free guidance
      dropped = jax.random.bernoulli(drop_rng, config.label_dropout, labels.shape)
      labels = jnp.where(dropped, model.null_label, labels)

    def loss_fn(params):
      logits = model.apply({"params": params}, tokens, labels, deterministic=False,
                           rngs={"dropout": dropout_rng})
      nll, accuracy = cross_entropy(logits, tokens)
      return jnp.mean(nll), jnp.mean(accuracy)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "bits_per_token": loss / math.log(2.0), "accuracy": accuracy,
               "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: vim_lib.VIM, tok_model: vitvqgan.ViTVQGAN) -> Callable:
  """(params, batch, tokenizer_params) -> per-example nll [B] and accuracy [B]."""

  def eval_step(params, batch, tokenizer_params):
    tokens = batch_tokens(batch, tok_model, tokenizer_params)
    logits = model.apply({"params": params}, tokens, batch["label"])
    nll, accuracy = cross_entropy(logits, tokens)
    return {"nll": nll, "accuracy": accuracy}

  return eval_step


def make_sample_fn(model: vim_lib.VIM, tok_model: vitvqgan.ViTVQGAN,
                   sampling_config: sampling.SamplingConfig) -> Callable:
  """(params, tokenizer_params, labels [B], rng) -> images [B, S, S, 3] in [-1, 1]."""

  def sample(params, tokenizer_params, labels, rng):
    tokens = sampling.sample_tokens(model, params, labels, rng, sampling_config)
    grid = tok_model.grid
    return tok_model.apply({"params": tokenizer_params},
                           tokens.reshape(tokens.shape[0], *grid),
                           method=vitvqgan.ViTVQGAN.decode_from_indices)

  return sample


def model_inputs(local_batch: dict) -> dict:
  """The arrays a step consumes (images or tokens, and labels), without the eval mask."""
  return {k: v for k, v in local_batch.items() if k != "mask"}


def sampling_config_from(config) -> sampling.SamplingConfig:
  s = config.sampling
  return sampling.SamplingConfig(s.temperature, s.top_k, s.top_p, s.guidance_scale)


def evaluate(eval_fn, params, tokenizer_params, eval_data: pipeline.InputPipeline, mesh):
  sums, count = {"nll": 0.0, "accuracy": 0.0}, 0
  for local in eval_data.iterate():
    batch = parallel.global_batch_from_local(model_inputs(local), mesh)
    out = multihost_utils.process_allgather(eval_fn(params, batch, tokenizer_params), tiled=True)
    mask = multihost_utils.process_allgather(local["mask"], tiled=True).astype(bool)
    for k in sums:
      sums[k] += float(np.sum(np.asarray(out[k], np.float64)[mask]))
    count += int(mask.sum())
  nll = sums["nll"] / count
  return {"loss": nll, "bits_per_token": nll / math.log(2.0), "accuracy": sums["accuracy"] / count,
          "num_images": count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       should_stop: Callable[[int], bool] | None = None,
                       devices: list[jax.Device] | None = None) -> RunResult:
  """Trains VIM for config.total_steps on a frozen tokenizer, resuming from workdir."""
  # --- Logging --------------------------------------------------------------------------------
  is_main = jax.process_index() == 0
  writer = train_lib.open_workdir(workdir, config)

  # --- Mesh -----------------------------------------------------------------------------------
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.axis_rules(config)
  replicated = NamedSharding(mesh, P())
  log.info("mesh: %s", dict(mesh.shape))
  train_lib.check_divisible(mesh, batch_size=config.batch_size,
                            eval_batch_size=config.eval_batch_size,
                            num_grid_images=config.num_grid_images)

  # --- Input ----------------------------------------------------------------------------------
  train_data, eval_data = pipeline.build_pipelines(config, jax.process_index(),
                                                   jax.process_count())
  if config.model.num_classes and config.model.num_classes != train_data.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the dataset has "
                     f"{train_data.num_classes} classes; set them equal (0 = unconditional).")

  # --- Frozen tokenizer, model and optimizer --------------------------------------------------
  if not config.tokenizer_workdir:
    raise ValueError("config.tokenizer_workdir is empty; point it at a stage-1 workdir, e.g. "
                     "--config.tokenizer_workdir=workdirs/vitvq_base")
  tok = tokenizer.load_tokenizer(config.tokenizer_workdir, shardings=replicated)
  log.info("tokenizer: %s step %d, %d tokens per image, codebook %d", config.tokenizer_workdir,
           tok.step, tok.num_tokens, tok.model.codebook_size)
  model = build_model(config, tok)
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
  num_params = vitvqgan.count_params(state.params)
  log.info("VIM parameters: %.2fM", num_params / 1e6)
  if is_main:
    parameter_overview.log_parameter_overview(state.params)

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
  train_step = jax.jit(make_train_step(model, tok.model, tx, schedule, config),
                       in_shardings=(state_shardings, batch_sharding, replicated),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, tok.model),
                      in_shardings=(state_shardings.params, batch_sharding, replicated))
  sample_fn = jax.jit(make_sample_fn(model, tok.model, sampling_config_from(config)),
                      in_shardings=(state_shardings.params, replicated, batch_sharding, None))
  with parallel.tracing_context(mesh, rules):
    train_step, flops_per_step = train_lib.compile_step(
        train_step, abstract_state, batch_spec(config.batch_size), tok.params)
    eval_step, _ = train_lib.compile_step(eval_step, abstract_state.params,
                                          batch_spec(config.eval_batch_size), tok.params)
  log.info(train_lib.describe_memory(train_step, "train step"))
  log.info("train step: %.3f GFLOP per device per step (XLA cost analysis, includes "
           "tokenization)", flops_per_step / 1e9)

  def run_eval(step: int):
    metrics = evaluate(eval_step, state.params, tok.params, eval_data, mesh)
    log.info("eval at step %d on %d images: %s", step, metrics["num_images"],
             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    n = config.num_grid_images
    labels = np.arange(n, dtype=np.int32) % max(model.num_classes, 1)
    with parallel.tracing_context(mesh, rules):
      images = sample_fn(state.params, tok.params,
                         jax.device_put(labels, batch_sharding), jax.random.key(step))
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
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
    reference = evaluators.reference_stats(config, extractor, config.fid.reference_stats)
    reference_label = evaluators.reference_label_for(config.fid.reference_stats, config,
                                                     reference)

  def sample_batches(step: int, num: int):
    """uint8 sample batches [<= eval_batch_size, S, S, 3], class-balanced."""
    labels = np.resize(np.arange(max(model.num_classes, 1), dtype=np.int32), num)
    b = config.eval_batch_size
    for i, start in enumerate(range(0, num, b)):
      chunk = np.resize(labels[start:start + b], b)
      with parallel.tracing_context(mesh, rules):
        images = sample_fn(state.params, tok.params, jax.device_put(chunk, batch_sharding),
                           jax.random.fold_in(jax.random.key(step), i))
      images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
      yield visualize.preprocess.to_uint8(images)[:min(b, num - start)]

  def run_fid(step: int):
    feats = extractor.extract(sample_batches(step, config.fid.num_images), "samples",
                              config.fid.num_images)
    against = f"{reference.description} ({reference.num_images or '?'} images)"
    results = evaluators.generator_metrics(feats, reference, reference_label, against, "")
    log.info("FID at step %d: %s", step, ", ".join(f"{k}={v['value']:.4g}"
                                                   for k, v in results.items()))
    writer.write_scalars(step, {f"eval/{k}": v["value"] for k, v in results.items()})
    return {k: v["value"] for k, v in results.items()}

  # --- Loop -------------------------------------------------------------------------------------
  progress = train_lib.Progress(start_step, config.total_steps, config.batch_size, flops_per_step,
                                mesh.size, tokens_per_example=tok.num_tokens)
  last_saved, history, logged, eval_metrics = latest, [], [], None
  train_iter = train_data.iterate(start_step)
  step = start_step
  while step < config.total_steps:
    local = next(train_iter)
    batch = parallel.global_batch_from_local(model_inputs(local), mesh)
    state, metrics = train_step(state, batch, tok.params)
    history.append(metrics)
    step += 1
    is_last = step == config.total_steps
    stop_now = ((should_stop is not None and should_stop(step))
                or train_lib.preemption_requested(step))

    if step % config.log_every == 0 or is_last or stop_now:
      scalars = train_lib.write_train_window(writer, step, history, progress, last_saved,
                                             train_data.skipped_images)
      history = []
      logged.append(scalars)
      log.info("step %d/%d: loss %.4f (%.3f bits/token), accuracy %.3f, %.2f steps/s, "
               "%.0f tokens/s/device, %.3f TFLOP/s/device, ETA %s", step, config.total_steps,
               scalars["loss"], scalars["bits_per_token"], scalars["accuracy"],
               scalars["steps_per_sec"], scalars["tokens_per_sec_per_device"],
               scalars["tflops_per_sec_per_device"],
               train_lib.format_duration(progress.eta_seconds(step)))

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
  return RunResult(state, logged, eval_metrics)


@dataclasses.dataclass
class TrainedVIM:
  model: vim_lib.VIM
  params: Any
  tokenizer: tokenizer.Tokenizer
  config: ml_collections.ConfigDict
  step: int


def load_vim(workdir: str, step: int | None = None) -> TrainedVIM:
  """Restores a stage-2 workdir (latest checkpoint by default) and its tokenizer, on device 0."""
  config = train_lib.read_run_config(workdir, "vim")
  tok = tokenizer.load_tokenizer(config.tokenizer_workdir)
  model = build_model(config, tok)
  tx, _ = build_optimizer(config)

  def init_fn(rng):
    params = model.init(rng, jnp.zeros((1, tok.num_tokens), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  import flax.linen as nn
  shapes = nn.meta.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints.")
  state = ckpt.restore(step, checkpoint.abstract_with_shardings(
      shapes, jax.tree.map(lambda _: device, shapes)))
  ckpt.close()
  return TrainedVIM(model, state.params, tok, config, int(step))
