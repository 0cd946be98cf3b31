"""Autoregressive sampling from VIM with a KV cache, in one jitted lax loop.

Each of the N steps runs the model on one token per sequence against the cached keys and
values of the earlier positions, so a sample costs N single-token passes instead of N passes
over a growing prefix. Temperature, top-k, top-p (nucleus) and classifier-free guidance
(logits = uncond + scale * (cond - uncond), with the null label as the unconditional half).

The step runs near its memory floor: it reads the params and the cache once and writes one
position of each layer's keys and values (in place, in the loop's carried buffers). For that,
a model with scanned layers decodes in the unrolled layout (`decoding_layout`), and the cache
is kept heads-major (see MultiHeadAttention); `tests/test_vim.py` counts the copies in the
compiled loop, `benchmarks/decode_floor.py` times the step against the floor.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from vim_jax.models import transformer
from vim_jax.models import vim as vim_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # 0 = greedy (argmax)
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  guidance_scale: float = 1.0  # 1 = plain conditional; > 1 strengthens the class


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k and/or the top-p nucleus to -inf. logits: [B, V]."""
  neg_inf = jnp.finfo(logits.dtype).min
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is < top_p (so the most likely one is always kept).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, neg_inf)
  return logits


def decoding_layout(model: vim_lib.VIM, params) -> tuple[vim_lib.VIM, dict]:
  """The same VIM with its layers unrolled, and its params in that layout (unchanged when
  they already are). Callers that sample many batches convert once (Sampler does), so that the
  scanned copy need not be kept; sample_tokens converts what it is given."""
  if not model.stack.scan_layers:
    return model, params
  model = model.clone(stack=dataclasses.replace(model.stack, scan_layers=False))
  params = {
      **params,
      "transformer": transformer.unstack_layers(params["transformer"], model.stack.num_layers),
  }
  return model, params


def init_cache(model: vim_lib.VIM, batch_size: int):
  """Zeroed KV cache for `batch_size` sequences."""
  shapes = jax.eval_shape(
      functools.partial(model.init, method=vim_lib.VIM.decode),
      jax.random.key(0),
      jnp.zeros((batch_size,), jnp.int32),
      jnp.zeros((batch_size,), jnp.int32),
      jnp.zeros((), jnp.int32),
  )["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def is_guided(model: vim_lib.VIM, config: SamplingConfig) -> bool:
  """Classifier-free guidance runs: a class-conditional model at a scale != 1 (each image then
  decodes two sequences, its class and the null class, as one batch)."""
  return model.num_classes > 0 and config.guidance_scale != 1.0


def make_decode_step(model: vim_lib.VIM, config: SamplingConfig = SamplingConfig()):
  """One step of sample_tokens' loop:
  (params, cache, previous [R], labels [R], tokens [B, N], index, rng) -> (cache, previous,
  tokens), where R = B sequences, or 2B with guidance (each image's class and the null class,
  interleaved: [c_0, null, c_1, null, ...], so that with the batch split over devices a pair
  never straddles two: halves [classes; nulls] made every step exchange logits), and the token at
  `index` is drawn with fold_in(rng, index). The compile report compiles it on its own."""
  guided = is_guided(model, config)

  def step(params, cache, previous, labels, tokens, index, rng):
    logits, mutated = model.apply(
        {"params": params, "cache": cache},
        previous,
        labels,
        index,
        method=vim_lib.VIM.decode,
        mutable=["cache"],
    )
    if guided:  # rows are (class, null) pairs: a pair stays on one device of the batch axes
      pairs = logits.reshape(-1, 2, logits.shape[-1])
      cond, uncond = pairs[:, 0], pairs[:, 1]
      logits = uncond + config.guidance_scale * (cond - uncond)
    if config.temperature == 0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, index), logits).astype(jnp.int32)
    tokens = tokens.at[:, index].set(token)
    previous = jnp.repeat(token, 2) if guided else token
    return mutated["cache"], previous, tokens

  return step


def sample_tokens(
    model: vim_lib.VIM,
    params,
    labels: jax.Array,
    rng: jax.Array,
    config: SamplingConfig = SamplingConfig(),
) -> jax.Array:
  """Draws token sequences.

  Args:
    params: the VIM params (the 'params' collection's contents).
    labels: int [B] requested classes (any values for an unconditional model).
    rng: PRNG key; the same key gives the same samples.
  Returns:
    int32 [B, N] tokens in raster order.
  """
  model, params = decoding_layout(model, params)
  model_labels = labels
  if is_guided(model, config):  # each image's class and null rows run side by side, as a pair
    model_labels = jnp.stack([labels, jnp.full_like(labels, model.null_label)], 1).reshape(-1)
  step = make_decode_step(model, config)

  def body(index, carry):
    cache, previous, tokens = carry
    return step(params, cache, previous, model_labels, tokens, index, rng)

  carry = (
      init_cache(model, model_labels.shape[0]),
      jnp.zeros((model_labels.shape[0],), jnp.int32),
      jnp.zeros((labels.shape[0], model.num_tokens), jnp.int32),
  )
  _, _, tokens = jax.lax.fori_loop(0, model.num_tokens, body, carry)
  return tokens


def sample_tokens_without_cache(
    model: vim_lib.VIM,
    params,
    labels: jax.Array,
    rng: jax.Array,
    config: SamplingConfig = SamplingConfig(),
) -> jax.Array:
  """Reference sampler that recomputes the whole prefix at every step (no KV cache, no
  guidance). Same tokens as sample_tokens for the same key; used by tests and benchmarks."""

  def step(index, tokens):
    logits = model.apply({"params": params}, tokens, labels)[:, index]
    if config.temperature == 0:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, index), logits).astype(jnp.int32)
    return tokens.at[:, index].set(token)

  tokens = jnp.zeros((labels.shape[0], model.num_tokens), jnp.int32)
  return jax.lax.fori_loop(0, model.num_tokens, step, tokens)
