"""The shared Transformer stack and the ViT-VQGAN modules: shapes, masks, logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stacks

from vim_jax.infra import parallel
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import transformer


def test_patchify_round_trip_and_raster_order():
  images = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  tokens = tokenizer_lib.patchify(images, 4)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(tokens[0, 1], images[0, 0:4, 4:8].reshape(-1))  # row 0, col 1
  np.testing.assert_array_equal(tokenizer_lib.unpatchify(tokens, (2, 3), 4), images)


def test_attention_width_is_independent_of_model_width():
  cfg = stacks.stack(num_layers=1, width=40, num_heads=3, head_dim=16, mlp_dim=64)
  stack = transformer.Transformer(cfg)
  x = jnp.ones((2, 5, 40))
  params = nn.meta.unbox(stack.init(jax.random.key(0), x))["params"]
  attn = params["block_00"]["attention"]
  assert attn["query_kernel"].shape == (40, 3, 16) and attn["out_kernel"].shape == (3, 16, 40)
  assert stack.apply({"params": params}, x).shape == (2, 5, 40)
  assert "ln_final" in params  # final LayerNorm after the blocks


def test_causal_attention_ignores_the_future():
  cfg = stacks.stack(num_layers=2, width=16, num_heads=2, head_dim=8, mlp_dim=32, causal=True)
  stack = transformer.Transformer(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  params = jax.jit(stack.init)(jax.random.key(1), x)
  apply = jax.jit(stack.apply)
  y = apply(params, x)
  x2 = x.at[:, 4:].set(jax.random.normal(jax.random.key(2), (1, 2, 16)))
  y2 = apply(params, x2)
  np.testing.assert_allclose(y[:, :4], y2[:, :4], atol=1e-6)
  assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_attention_matches_numpy_reference():
  mha = transformer.MultiHeadAttention(num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (1, 3, 6))
  p = nn.meta.unbox(mha.init(jax.random.key(1), x))["params"]
  p = jax.tree.map(np.asarray, p)
  xn = np.asarray(x, np.float64)
  proj = lambda n: np.einsum("bld,dhk->blhk", xn, p[n + "_kernel"]) + p[n + "_bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(4)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", w, v)
  ref = np.einsum("blhk,hkd->bld", out, p["out_kernel"]) + p["out_bias"]
  np.testing.assert_allclose(np.asarray(mha.apply({"params": p}, x)), ref, rtol=1e-5, atol=1e-5)


def test_every_parameter_has_logical_axis_names(tiny_config):
  model = tokenizer_lib.ViTVQGAN.from_config(tiny_config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = {name for name, _ in parallel.DEFAULT_AXIS_RULES}
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"parameter without logical axes: {leaf}"
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= known, leaf.names


def test_logit_laplace_head_shapes(tiny_config):
  model = tokenizer_lib.ViTVQGAN.from_config(tiny_config)
  images = jnp.zeros((2, 32, 32, 3))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images))
  out = jax.jit(model.apply)(params, images)
  assert out["mu"].shape == out["log_scale"].shape == out["reconstruction"].shape == images.shape
  # The reconstruction is the closed form of the predicted mu (float64 numpy).
  mu = np.asarray(out["mu"], np.float64)
  eps = model.logit_laplace_eps
  expected = np.clip((1 / (1 + np.exp(-mu)) - eps) / (1 - 2 * eps), 0, 1) * 2 - 1
  np.testing.assert_allclose(np.asarray(out["reconstruction"]), expected, atol=1e-6)
  tiny_config.model.logit_laplace = False
  plain = tokenizer_lib.ViTVQGAN.from_config(tiny_config)
  out = jax.jit(plain.apply)(nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), images)), images)
  assert set(out) >= {"reconstruction", "indices", "vq_loss"} and "mu" not in out


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_logit_laplace_reconstruction_inverts_the_squashing(eps):
  """For an image x in [-1, 1], mu = logit(squash(x)) must give x back; locations beyond the
  squashed range clip to the image range."""
  x = np.linspace(-1, 1, 41)
  squashed = (x + 1) / 2 * (1 - 2 * eps) + eps  # [-1, 1] -> [eps, 1 - eps]
  mu = np.log(squashed) - np.log1p(-squashed)
  ours = np.asarray(tokenizer_lib.logit_laplace_reconstruction(jnp.asarray(mu, jnp.float32), eps))
  np.testing.assert_allclose(ours, x, atol=2e-6)
  extreme = tokenizer_lib.logit_laplace_reconstruction(jnp.array([-50.0, 50.0]), eps)
  np.testing.assert_array_equal(np.asarray(extreme), [-1.0, 1.0])


def test_bad_image_shape_is_a_clear_error(tiny_config):
  model = tokenizer_lib.ViTVQGAN.from_config(tiny_config)
  with pytest.raises(ValueError, match=r"expected images of shape \[B, 32, 32, 3\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  tiny_config.image_size = 30
  with pytest.raises(ValueError, match="not a multiple of model.patch_size"):
    tokenizer_lib.ViTVQGAN.from_config(tiny_config)


def test_mesh_shape_resolution():
  assert parallel.resolve_mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  assert parallel.resolve_mesh_shape(dict(data=1, fsdp=-1, tensor=4), 8) == (1, 2, 4)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.resolve_mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.resolve_mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="uses 4 devices"):
    parallel.resolve_mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)


def _vitvqgan_reference(p, images, patch, eps_ll):
  """The paper-layout ViT-VQGAN forward written out in float64 numpy from the paper's
  description: patches (raster order, each p x p x 3 row-major) -> linear -> + learned
  positions -> pre-LN blocks (multi-head attention, GELU MLP) with a final LayerNorm -> the
  Linear-tanh-Linear output FFN -> linear to the code space; l2-normalized lookup of the
  nearest code; the decoder's mirror image, whose FFN gives (mu, log b) per pixel channel;
  reconstruction sigmoid(mu), unsquashed from [eps, 1 - eps] and clipped to [-1, 1]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  dense = lambda x, q: x @ q["kernel"] + q["bias"]
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

  def layer_norm(x, q):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

  def transformer(x, q):
    blocks = q["layers"]["block"]
    for i in range(blocks["ln_mlp"]["scale"].shape[0]):  # the scanned layers
      b = jax.tree.map(lambda a: a[i], blocks)
      a = b["attention"]
      y = layer_norm(x, b["ln_attention"])
      qkv = [
          np.einsum("bld,dhk->blhk", y, a[f"{n}_kernel"]) + a[f"{n}_bias"]
          for n in ("query", "key", "value")
      ]
      logits = np.einsum("bqhk,bshk->bhqs", qkv[0], qkv[1]) / np.sqrt(qkv[0].shape[-1])
      weights = np.exp(logits - logits.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      heads = np.einsum("bhqs,bshk->bqhk", weights, qkv[2])
      x = x + np.einsum("blhk,hkd->bld", heads, a["out_kernel"]) + a["out_bias"]
      y = layer_norm(x, b["ln_mlp"])
      x = x + dense(gelu(dense(y, b["mlp"]["fc1"])), b["mlp"]["fc2"])
    return layer_norm(x, q["ln_final"])

  ffn = lambda x, q: dense(np.tanh(dense(x, q["hidden"])), q["out"])
  normalize = lambda v: v / np.sqrt(np.sum(v**2, -1, keepdims=True) + 1e-6)
  b, size = images.shape[:2]
  g = size // patch
  patches = (
      images.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  )
  enc, dec = p["encoder"], p["decoder"]
  x = dense(patches, enc["patch_embedding"]) + enc["position_embedding"]
  z = normalize(dense(ffn(transformer(x, enc["transformer"]), enc["output_ffn"]), enc["to_code"]))
  codebook = normalize(p["quantizer"]["codebook"])
  indices = np.argmax(z @ codebook.T, -1)
  codes = codebook[indices]
  x = dense(codes, dec["from_code"]) + dec["position_embedding"]
  out = ffn(transformer(x, dec["transformer"]), dec["output_ffn"])  # [B, N, p * p * 6]
  pixels = (
      out.reshape(b, g, g, patch, patch, 6).transpose(0, 1, 3, 2, 4, 5).reshape(b, size, size, 6)
  )
  mu, log_scale = pixels[..., :3], pixels[..., 3:]
  x01 = (1 / (1 + np.exp(-mu)) - eps_ll) / (1 - 2 * eps_ll)
  return {
      "indices": indices.reshape(b, g, g),
      "mu": mu,
      "log_scale": log_scale,
      "reconstruction": np.clip(x01, 0, 1) * 2 - 1,
      "vq_loss": 1.25 * np.mean((z - codes) ** 2),
  }


def test_paper_layout_vitvqgan_matches_a_numpy_forward(tiny_config):
  """The paper's layout (learned position embeddings, output FFNs, logit-Laplace head, scanned
  pre-LN blocks as the paper configs build them) at 8 px, against the float64 reference with
  the same params, every one of them moved off its initial value (zero biases, unit LayerNorm
  scales) so that each one's place shows."""
  c = tiny_config
  c.image_size = 8
  for stack in (c.model.encoder, c.model.decoder):
    stack.update(num_layers=2, width=16, num_heads=2, head_dim=4, mlp_dim=32)
  c.model.update(patch_size=4, codebook_size=16, code_dim=4)
  assert (c.model.position_embedding, c.model.output_ffn, c.model.logit_laplace) == (
      "learned",
      True,
      True,
  ) and c.model.encoder.scan_layers
  model = tokenizer_lib.ViTVQGAN.from_config(c)
  images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), images))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  out = jax.jit(model.apply)({"params": params}, images)
  ref = _vitvqgan_reference(params, np.asarray(images, np.float64), 4, model.logit_laplace_eps)
  np.testing.assert_array_equal(np.asarray(out["indices"]), ref["indices"])
  assert len(np.unique(ref["indices"])) > 2
  for key in ("mu", "log_scale", "reconstruction"):
    np.testing.assert_allclose(np.asarray(out[key]), ref[key], rtol=1e-4, atol=1e-5, err_msg=key)
  assert float(out["vq_loss"]) == pytest.approx(ref["vq_loss"], rel=1e-4)
