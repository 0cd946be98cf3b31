"""VIM and its sampler: cached decoding equals the full forward pass; sampling controls."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stacks

from vim_jax.infra import hlo_stats
from vim_jax.models import vim as vim_lib
from vim_jax.sampling import autoregressive

V, N, C = 32, 12, 3


def _model(num_classes=C, condition_every_position=False, scan_layers=False):
  stack = stacks.stack(
      num_layers=2,
      width=32,
      num_heads=2,
      head_dim=16,
      mlp_dim=64,
      causal=True,
      scan_layers=scan_layers,
  )
  model = stacks.vim(
      stack=stack,
      vocab_size=V,
      num_tokens=N,
      num_classes=num_classes,
      condition_every_position=condition_every_position,
  )
  params = nn.meta.unbox(
      model.init(jax.random.key(0), jnp.zeros((2, N), jnp.int32), jnp.zeros((2,), jnp.int32))
  )["params"]
  return model, params


@pytest.mark.parametrize("condition_every_position", [False, True])
def test_cached_decoding_gives_the_full_forward_logits(condition_every_position):
  model, params = _model(condition_every_position=condition_every_position)
  tokens = jax.random.randint(jax.random.key(1), (2, N), 0, V)
  labels = jnp.array([0, 2])
  full = model.apply({"params": params}, tokens, labels)
  cache = autoregressive.init_cache(model, 2)
  previous = jnp.zeros((2,), jnp.int32)
  # One compiled step (the sampler's way) instead of N eager applies: seconds, not a minute.
  decode = jax.jit(
      lambda cache, previous, i: model.apply(
          {"params": params, "cache": cache},
          previous,
          labels,
          i,
          method=vim_lib.VIM.decode,
          mutable=["cache"],
      )
  )
  for i in range(N):
    logits, mutated = decode(cache, previous, jnp.int32(i))
    cache = mutated["cache"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, i]), atol=2e-5, rtol=1e-5)
    previous = tokens[:, i]


def test_logits_are_causal_and_conditioned_on_the_class():
  model, params = _model()
  tokens = jax.random.randint(jax.random.key(1), (1, N), 0, V)
  base = model.apply({"params": params}, tokens, jnp.array([0]))
  changed = model.apply({"params": params}, tokens.at[:, 6:].set(0), jnp.array([0]))
  np.testing.assert_allclose(base[:, :7], changed[:, :7], atol=1e-6)  # logits i see tokens < i
  other_class = model.apply({"params": params}, tokens, jnp.array([1]))
  assert not np.allclose(base[:, 0], other_class[:, 0])


def test_condition_every_position_adds_the_class_embedding_to_every_input():
  """The Transformer's inputs are [c, e(t_0), .., e(t_{N-2})] + positions, plus c at every
  position when on: checked against the embedding tables."""
  model, params = _model(condition_every_position=True)
  tokens = jax.random.randint(jax.random.key(1), (2, N), 0, V)
  labels = jnp.array([2, 0])
  inputs = model.apply({"params": params}, tokens, labels, method=lambda m, t, l: m._inputs(t, l))
  table = np.asarray(params["token_embedding"]["embedding"])
  cond = np.asarray(params["condition_embedding"]["embedding"])[np.asarray(labels)][:, None]
  shifted = np.concatenate([cond, table[np.asarray(tokens)[:, :-1]]], axis=1)
  expected = shifted + cond + np.asarray(params["position_embedding"])[None]
  np.testing.assert_allclose(np.asarray(inputs), expected, atol=1e-6)
  plain, _ = _model(condition_every_position=False)
  no_cond = plain.apply({"params": params}, tokens, labels, method=lambda m, t, l: m._inputs(t, l))
  np.testing.assert_allclose(np.asarray(no_cond), expected - cond, atol=1e-6)


def test_greedy_sampling_is_deterministic_and_matches_the_uncached_sampler():
  model, params = _model()
  labels = jnp.array([0, 1, 2])
  greedy = autoregressive.SamplingConfig(temperature=0.0)
  a = autoregressive.sample_tokens(model, params, labels, jax.random.key(0), greedy)
  b = autoregressive.sample_tokens(model, params, labels, jax.random.key(7), greedy)
  np.testing.assert_array_equal(a, b)
  ref = autoregressive.sample_tokens_without_cache(model, params, labels, jax.random.key(0), greedy)
  np.testing.assert_array_equal(a, ref)
  # Greedy tokens are the argmax of the full forward pass on the sampled sequence.
  logits = model.apply({"params": params}, a, labels)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.argmax(logits, -1)))


def test_a_scanned_model_decodes_in_the_unrolled_layout_with_the_same_samples():
  """sample_tokens unrolls a scanned stack for decoding (transformer.unstack_layers): the
  tokens equal the full forward pass of the scanned model, at temperature 1."""
  model, params = _model(scan_layers=True)
  labels, key = jnp.array([0, 1, 2]), jax.random.key(5)
  cached = autoregressive.sample_tokens(model, params, labels, key)
  ref = autoregressive.sample_tokens_without_cache(model, params, labels, key)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(ref))
  unrolled, unrolled_params = autoregressive.decoding_layout(model, params)
  assert not unrolled.stack.scan_layers and "block_01" in unrolled_params["transformer"]
  np.testing.assert_array_equal(
      unrolled_params["transformer"]["block_01"]["mlp"]["fc1"]["kernel"],
      params["transformer"]["layers"]["block"]["mlp"]["fc1"]["kernel"][1],
  )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_each_decoded_token_writes_one_cache_position_per_layer_and_copies_nothing(scan_layers):
  """In the compiled sampler (guided: 2 x 3 sequences), the token loop's only writes to a
  KV-cache-shaped buffer are the two dynamic-update-slices per layer (K and V at the new
  position). The layer-scanned decode this replaced copied the cache 12 times per loop body
  (stacked cache sliced out, written back, transposed for the attention einsum)."""
  model, params = _model(scan_layers=scan_layers)
  labels = jnp.array([0, 1, 2])
  config = autoregressive.SamplingConfig(top_k=5, guidance_scale=2.0)
  hlo = (
      jax.jit(lambda p, l, k: autoregressive.sample_tokens(model, p, l, k, config))
      .lower(params, labels, jax.random.key(0))
      .compile()
      .as_text()
  )
  (cache_shape,) = {
      x.shape
      for x in jax.tree.leaves(
          autoregressive.init_cache(autoregressive.decoding_layout(model, params)[0], 6)
      )
  }
  writes = hlo_stats.buffer_writes_in_loops(hlo, cache_shape)
  assert writes == {"updates": 2 * model.stack.num_layers, "full": 0}, writes


def test_fixed_seed_reproduces_samples_and_seeds_differ():
  model, params = _model()
  labels = jnp.array([0, 1])
  cfg = autoregressive.SamplingConfig(temperature=1.0)
  a = autoregressive.sample_tokens(model, params, labels, jax.random.key(3), cfg)
  b = autoregressive.sample_tokens(model, params, labels, jax.random.key(3), cfg)
  c = autoregressive.sample_tokens(model, params, labels, jax.random.key(4), cfg)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  ref = autoregressive.sample_tokens_without_cache(model, params, labels, jax.random.key(3), cfg)
  np.testing.assert_array_equal(a, ref)  # same key: the cache changes speed, not samples


def test_top_k_and_top_p_never_emit_excluded_tokens():
  logits = jax.random.normal(jax.random.key(0), (4, V)) * 3
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  filtered = autoregressive.filter_logits(logits, top_k=3)
  draws = jax.random.categorical(jax.random.key(1), filtered, shape=(2000, 4))
  for row in range(4):
    assert set(np.asarray(draws[:, row]).tolist()) <= set(top3[row].tolist())
  probs = np.asarray(jax.nn.softmax(logits))
  filtered = np.asarray(autoregressive.filter_logits(logits, top_p=0.5))
  for row in range(4):
    order = np.argsort(-probs[row])
    mass_before = np.cumsum(probs[row][order]) - probs[row][order]
    allowed = set(order[mass_before < 0.5].tolist())
    kept = set(np.nonzero(filtered[row] > np.finfo(np.float32).min)[0].tolist())
    assert kept == allowed and len(kept) >= 1
  # The sampler honours them too: with top_k=1 sampling is greedy.
  model, params = _model()
  labels = jnp.array([0, 1])
  top1 = autoregressive.sample_tokens(
      model,
      params,
      labels,
      jax.random.key(5),
      autoregressive.SamplingConfig(temperature=1.0, top_k=1),
  )
  greedy = autoregressive.sample_tokens(
      model, params, labels, jax.random.key(5), autoregressive.SamplingConfig(temperature=0.0)
  )
  np.testing.assert_array_equal(top1, greedy)


def _filtered_softmax(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
  """The distribution a draw should follow, in float64: softmax(logits / T) restricted to the k
  largest logits (all when k = 0) and renormalised there, zero elsewhere. logits: [B, V]."""
  z = np.asarray(logits, np.float64) / temperature
  if top_k:
    kth = -np.sort(-z, axis=-1)[:, top_k - 1 : top_k]
    z = np.where(z >= kth, z, -np.inf)
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("top_k", [1, 2, 5, V - 1, V, 0])
def test_top_k_leaves_exactly_k_tokens_with_the_softmax_renormalised_over_them(top_k):
  """softmax(filter_logits(logits, k)) has exactly k non-zero probabilities (V for k = 0 or
  k >= V), and they equal the numpy softmax restricted to the k largest logits: a filter that
  keeps only the argmax, or the k smallest, or changes the kept logits, fails."""
  logits = np.asarray(jax.random.normal(jax.random.key(0), (4, V)) * 3)
  filtered = np.asarray(autoregressive.filter_logits(jnp.asarray(logits), top_k=top_k), np.float64)
  p = np.exp(filtered - filtered.max(-1, keepdims=True))  # finfo.min - max underflows to 0
  p /= p.sum(-1, keepdims=True)
  expected = _filtered_softmax(logits, 1.0, top_k)
  np.testing.assert_array_equal(np.count_nonzero(p, axis=-1), [top_k or V] * 4)
  np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("temperature, top_k", [(0.5, 0), (2.0, 0), (1.0, 5), (0.5, 5)])
def test_sampled_tokens_follow_the_tempered_top_k_softmax(temperature, top_k):
  """The sampler's first token (which depends only on the label) over n = 4096 sequences,
  against softmax(logits / T) restricted to the top k, computed in numpy from the full forward
  pass: a token outside the top k never appears, and each token's frequency is within 5
  binomial standard deviations sqrt(p (1 - p) / n) of p (plus one draw, for tokens so unlikely
  that a single draw exceeds that). `logits * T` for `logits / T`, or a top-k filter that keeps
  only the argmax, moves some frequency by far more (each is tried in the note of issue 31)."""
  model, params = _model()
  n = 4096
  labels = jnp.full((n,), 1, jnp.int32)
  config = autoregressive.SamplingConfig(temperature=temperature, top_k=top_k)
  first = np.asarray(
      jax.jit(lambda p, l, k: autoregressive.sample_tokens(model, p, l, k, config))(
          params, labels, jax.random.key(11)
      )[:, 0]
  )
  logits = model.apply({"params": params}, jnp.zeros((1, N), jnp.int32), labels[:1])[:, 0]
  p = _filtered_softmax(np.asarray(logits), temperature, top_k)[0]
  frequency = np.bincount(first, minlength=V) / n
  assert np.all(frequency[p == 0] == 0), "a token outside the top k was drawn"
  bound = 5 * np.sqrt(p * (1 - p) / n) + 1 / n
  worst = int(np.argmax(np.abs(frequency - p) / bound))
  assert np.all(np.abs(frequency - p) <= bound), (
      f"token {worst}: frequency {frequency[worst]:.4f}, expected {p[worst]:.4f} +- "
      f"{bound[worst]:.4f}"
  )


def _guided_reference(model, params, labels, key, scale):
  """Sampling at temperature 1 with guided logits u + s (c - u), where c and u come from two
  full forward passes (the labels, and the null class) over the prefix: no cache, no batching
  of the two halves."""
  tokens = jnp.zeros((labels.shape[0], N), jnp.int32)
  null = jnp.full_like(labels, model.null_label)
  for i in range(N):
    c = model.apply({"params": params}, tokens, labels)[:, i]
    u = model.apply({"params": params}, tokens, null)[:, i]
    token = jax.random.categorical(jax.random.fold_in(key, i), u + scale * (c - u))
    tokens = tokens.at[:, i].set(token.astype(jnp.int32))
  return np.asarray(tokens)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_sampling_equals_two_full_forward_passes(scale):
  """Every sampled token (temperature 1, so the whole logit vector matters, not only its
  argmax) equals the reference's; at scale 1 that is the plain conditional sampler."""
  model, params = _model()
  labels, key = jnp.array([0, 1, 2, 1]), jax.random.key(2)
  ours = autoregressive.sample_tokens(
      model, params, labels, key, autoregressive.SamplingConfig(guidance_scale=scale)
  )
  np.testing.assert_array_equal(
      np.asarray(ours), _guided_reference(model, params, labels, key, scale)
  )
  if scale == 1.0:
    plain = autoregressive.sample_tokens_without_cache(model, params, labels, key)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))
  else:  # guidance really changes what is drawn
    assert not np.array_equal(np.asarray(ours), _guided_reference(model, params, labels, key, 1.0))


def test_unconditional_model_ignores_labels_and_features_shape():
  model, params = _model(num_classes=0)
  tokens = jax.random.randint(jax.random.key(1), (2, N), 0, V)
  a = model.apply({"params": params}, tokens, jnp.array([0, 5]))
  b = model.apply({"params": params}, tokens, None)
  np.testing.assert_allclose(a, b)
  feats = model.apply({"params": params}, tokens, None, 1, method=vim_lib.VIM.features)
  assert feats.shape == (2, 32)
  with pytest.raises(ValueError, match="capture_block=3"):
    model.apply({"params": params}, tokens, None, 3, method=vim_lib.VIM.features)


def test_a_bfloat16_vim_computes_its_logits_in_float32():
  """The head's matmul accumulates in float32 (bf16 inputs, as the compute dtype asks), and the
  logits and log-softmax stay float32, in the loss and in cached sampling alike."""
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 3, 256)).astype(np.float32)
  kernel = (rng.normal(size=(256, V)) / 16).astype(np.float32)
  bias = rng.normal(size=(V,)).astype(np.float32)
  logits = vim_lib.head_logits(jnp.asarray(h), jnp.asarray(kernel), jnp.asarray(bias), jnp.bfloat16)
  as_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
  expected = as_bf16(h) @ as_bf16(kernel) + bias  # float64 sums of the bf16-rounded inputs
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)

  stack = stacks.stack(num_layers=1, width=32, num_heads=2, head_dim=16, mlp_dim=64, causal=True)
  model = stacks.vim(stack=stack, vocab_size=V, num_tokens=N, num_classes=C, dtype=jnp.bfloat16)
  tokens = jax.random.randint(jax.random.key(1), (2, N), 0, V)
  labels = jnp.array([0, 2])
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens, labels))["params"]
  full = model.apply({"params": params}, tokens, labels)
  nll, accuracy = model.apply({"params": params}, tokens, labels, method=vim_lib.VIM.loss)
  cache = autoregressive.init_cache(model, 2)
  step, _ = model.apply(
      {"params": params, "cache": cache},
      tokens[:, 0],
      labels,
      jnp.int32(0),
      method=vim_lib.VIM.decode,
      mutable=["cache"],
  )
  assert full.dtype == nll.dtype == accuracy.dtype == step.dtype == jnp.float32
  reference_nll = -np.take_along_axis(
      np.asarray(jax.nn.log_softmax(full), np.float64), np.asarray(tokens)[..., None], -1
  )[..., 0].mean(-1)
  np.testing.assert_allclose(np.asarray(nll), reference_nll, rtol=1e-5)
