"""Stage 2, VIM: the model over a frozen tokenizer's codes, its optimizer and the pure step
functions (train, eval, sample), shared by the trainer (trainers/vim.py), sampling, evaluation and
the compile report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vim_jax.data import pipeline
from vim_jax.infra import parallel, prng
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import vim as vim_lib
from vim_jax.sampling import autoregressive
from vim_jax.trainers import microbatch, optim
from vim_jax.trainers.train_state import TrainState

log = logging.getLogger(__name__)


def build_model(config, tok_model: tokenizer_lib.ViTVQGAN) -> vim_lib.VIM:
  """The VIM a stage-2 config describes, over the tokenizer's codebook and token grid."""
  if config.image_size != tok_model.image_size:
    raise ValueError(
        f"config.image_size={config.image_size} but the tokenizer at "
        f"{config.tokenizer_workdir} was trained at {tok_model.image_size}; set "
        f"--config.image_size={tok_model.image_size}."
    )
  return vim_lib.VIM.from_config(
      config, tok_model.codebook_size, tok_model.grid[0] * tok_model.grid[1]
  )


def build_optimizer(config):
  schedule = optim.warmup_exponential_schedule(config.optimizer, config.total_steps)
  return optim.adamw(config.optimizer, schedule), schedule


def make_init_fn(model: vim_lib.VIM, tx, init_batch: int) -> Callable:
  """rng -> TrainState whose params carry logical-axis boxes (unbox after sharding)."""

  def init(rng):
    params = model.init(
        rng,
        jnp.zeros((init_batch, model.num_tokens), jnp.int32),
        jnp.zeros((init_batch,), jnp.int32),
    )["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def batch_spec(config, batch_size: int, tokens_per_image: int, sharding) -> dict:
  """The arrays a stage-2 step takes from a batch, as ShapeDtypeStructs: labels, and images
  (tokenized inside the step) or, with data.source = 'tokens', pre-tokenized codes."""
  spec = {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  if config.data.source == "tokens":
    spec["tokens"] = jax.ShapeDtypeStruct(
        (batch_size, tokens_per_image), jnp.int32, sharding=sharding
    )
  else:
    spec["image"] = jax.ShapeDtypeStruct(
        (batch_size, config.image_size, config.image_size, 3), jnp.float32, sharding=sharding
    )
  return spec


def batch_tokens(batch, tok_model: tokenizer_lib.ViTVQGAN, tokenizer_params) -> jax.Array:
  """int32 [B, N] tokens: pre-tokenized ones, or the frozen tokenizer's for batch['image']."""
  if "tokens" in batch:
    return batch["tokens"]
  tokens = tok_model.apply(
      {"params": tokenizer_params}, batch["image"], method=tokenizer_lib.ViTVQGAN.encode_to_indices
  )
  return jax.lax.stop_gradient(tokens.reshape(tokens.shape[0], -1))


def make_train_step(
    model: vim_lib.VIM,
    tok_model: tokenizer_lib.ViTVQGAN,
    tx,
    schedule,
    config,
    data_parallel: int = 1,
) -> Callable:
  """(state, batch, tokenizer_params) -> (state, metrics).

  batch: image [B, S, S, 3] in [-1, 1] (or tokens int [B, N]), label int [B].
  With config.grad_accum_steps = k, the gradient is the mean over k microbatches (see
  vim_jax/trainers/microbatch.py); data_parallel is the mesh's data x fsdp size.
  """
  k = config.grad_accum_steps

  def train_step(state: TrainState, batch, tokenizer_params):
    # The key is made where the step is traced: its implementation follows the mesh's platform.
    rng = jax.random.fold_in(prng.dropout_key(config), state.step)
    drop_rng, dropout_rng = jax.random.split(rng)
    labels = batch["label"]
    if model.num_classes and config.label_dropout > 0:  # for classifier-free guidance
      dropped = jax.random.bernoulli(drop_rng, config.label_dropout, labels.shape)
      labels = jnp.where(dropped, model.null_label, labels)

    def microbatch_gradients(micro, index):
      tokens = batch_tokens(micro, tok_model, tokenizer_params)
      micro_rng = dropout_rng if k == 1 else jax.random.fold_in(dropout_rng, index)

      def loss_fn(params):
        nll, accuracy = model.apply(
            {"params": params},
            tokens,
            micro["label"],
            deterministic=False,
            method=vim_lib.VIM.loss,
            rngs={"dropout": micro_rng},
        )
        return jnp.mean(nll), jnp.mean(accuracy)

      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return grads, loss, accuracy

    grads, loss, accuracy = microbatch.mean_over_microbatches(
        microbatch_gradients, {**batch, "label": labels}, k, data_parallel
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "bits_per_token": loss / math.log(2.0),
        "accuracy": accuracy,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: vim_lib.VIM, tok_model: tokenizer_lib.ViTVQGAN) -> Callable:
  """(params, batch, tokenizer_params) -> per-example nll [B] and accuracy [B]."""

  def eval_step(params, batch, tokenizer_params):
    tokens = batch_tokens(batch, tok_model, tokenizer_params)
    nll, accuracy = model.apply({"params": params}, tokens, batch["label"], method=vim_lib.VIM.loss)
    return {"nll": nll, "accuracy": accuracy}

  return eval_step


def make_sample_fn(
    model: vim_lib.VIM,
    tok_model: tokenizer_lib.ViTVQGAN,
    sampling_config: autoregressive.SamplingConfig,
) -> Callable:
  """(params, tokenizer_params, labels [B], rng) -> images [B, S, S, 3] in [-1, 1]."""

  def sample(params, tokenizer_params, labels, rng):
    tokens = autoregressive.sample_tokens(model, params, labels, rng, sampling_config)
    grid = tok_model.grid
    return tok_model.apply(
        {"params": tokenizer_params},
        tokens.reshape(tokens.shape[0], *grid),
        method=tokenizer_lib.ViTVQGAN.decode_from_indices,
    )

  return sample


def model_inputs(local_batch: dict) -> dict:
  """The arrays a step consumes (images or tokens, and labels), without the eval mask."""
  return {k: v for k, v in local_batch.items() if k != "mask"}


def sampling_config_from(config) -> autoregressive.SamplingConfig:
  s = config.sampling
  return autoregressive.SamplingConfig(s.temperature, s.top_k, s.top_p, s.guidance_scale)


def guided(config) -> bool:
  """Whether a stage-2 config samples with classifier-free guidance (autoregressive.is_guided:
  each image then decodes two sequences, its class and the null class)."""
  return config.model.num_classes > 0 and config.sampling.guidance_scale != 1.0


def sampling_batch_size(config, num_devices: int, with_guidance: bool | None = None) -> int:
  """Images per sampling batch over `num_devices` data-parallel devices (the global batch).

  config.sampling.batch_size counts sequences decoded at once per device, which is what fills
  a chip's memory (the KV cache); with guidance each image is two of them, so a batch holds
  half as many images (with_guidance: whether the sampler guides, when a command overrides
  the config's scale). See benchmarks/RESULTS.md, "Sampling 50k images: sizing on TPU"."""
  with_guidance = guided(config) if with_guidance is None else with_guidance
  per_device = config.sampling.batch_size // (2 if with_guidance else 1)
  return max(1, per_device) * num_devices


def evaluate(eval_fn, params, tokenizer_params, eval_data: pipeline.InputPipeline, mesh):
  sums, count = {"nll": 0.0, "accuracy": 0.0}, 0
  for local in eval_data.iterate():
    batch = parallel.global_batch_from_local(
        {**model_inputs(local), "mask": local["mask"]}, mesh, eval_data.global_batch_size
    )
    mask = batch.pop("mask")
    out, mask = parallel.fetch((eval_fn(params, batch, tokenizer_params), mask))
    mask = mask.astype(bool)
    for k in sums:
      sums[k] += float(np.sum(np.asarray(out[k], np.float64)[mask]))
    count += int(mask.sum())
  nll = sums["nll"] / count
  return {
      "loss": nll,
      "bits_per_token": nll / math.log(2.0),
      "accuracy": sums["accuracy"] / count,
      "num_images": count,
  }
