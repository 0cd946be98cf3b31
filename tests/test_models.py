"""The shared Transformer stack and the ViT-VQGAN modules: shapes, masks, logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax import parallel
from vim_jax.models import transformer, vitvqgan


def test_patchify_round_trip_and_raster_order():
  images = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  tokens = vitvqgan.patchify(images, 4)
  assert tokens.shape == (2, 6, 48)
  np.testing.assert_array_equal(tokens[0, 1], images[0, 0:4, 4:8].reshape(-1))  # row 0, col 1
  np.testing.assert_array_equal(vitvqgan.unpatchify(tokens, (2, 3), 4), images)


def test_attention_width_is_independent_of_model_width():
  cfg = transformer.StackConfig(num_layers=1, width=40, num_heads=3, head_dim=16, mlp_dim=64)
  stack = transformer.Transformer(cfg)
  x = jnp.ones((2, 5, 40))
  params = nn.meta.unbox(stack.init(jax.random.key(0), x))["params"]
  attn = params["block_00"]["attention"]
  assert attn["query_kernel"].shape == (40, 3, 16) and attn["out_kernel"].shape == (3, 16, 40)
  assert stack.apply({"params": params}, x).shape == (2, 5, 40)
  assert "ln_final" in params  # final LayerNorm after the blocks


def test_causal_attention_ignores_the_future():
  cfg = transformer.StackConfig(num_layers=2, width=16, num_heads=2, head_dim=8, mlp_dim=32,
                                causal=True)
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
  model = vitvqgan.ViTVQGAN.from_config(tiny_config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = {name for name, _ in parallel.DEFAULT_AXIS_RULES}
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"parameter without logical axes: {leaf}"
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= known, leaf.names


def test_logit_laplace_head_shapes(tiny_config):
  model = vitvqgan.ViTVQGAN.from_config(tiny_config)
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
  plain = vitvqgan.ViTVQGAN.from_config(tiny_config)
  out = jax.jit(plain.apply)(nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), images)),
                             images)
  assert set(out) >= {"reconstruction", "indices", "vq_loss"} and "mu" not in out


@pytest.mark.parametrize("eps", [0.1, 1e-3])
def test_logit_laplace_reconstruction_inverts_the_squashing(eps):
  """For an image x in [-1, 1], mu = logit(squash(x)) must give x back; locations beyond the
  squashed range clip to the image range."""
  x = np.linspace(-1, 1, 41)
  squashed = (x + 1) / 2 * (1 - 2 * eps) + eps  # [-1, 1] -> [eps, 1 - eps]
  mu = np.log(squashed) - np.log1p(-squashed)
  ours = np.asarray(vitvqgan.logit_laplace_reconstruction(jnp.asarray(mu, jnp.float32), eps))
  np.testing.assert_allclose(ours, x, atol=2e-6)
  extreme = vitvqgan.logit_laplace_reconstruction(jnp.array([-50.0, 50.0]), eps)
  np.testing.assert_array_equal(np.asarray(extreme), [-1.0, 1.0])


def test_bad_image_shape_is_a_clear_error(tiny_config):
  model = vitvqgan.ViTVQGAN.from_config(tiny_config)
  with pytest.raises(ValueError, match=r"expected images of shape \[B, 32, 32, 3\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  tiny_config.image_size = 30
  with pytest.raises(ValueError, match="not a multiple of model.patch_size"):
    vitvqgan.ViTVQGAN.from_config(tiny_config)


def test_mesh_shape_resolution():
  assert parallel.resolve_mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  assert parallel.resolve_mesh_shape(dict(data=1, fsdp=-1, tensor=4), 8) == (1, 2, 4)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.resolve_mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.resolve_mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="uses 4 devices"):
    parallel.resolve_mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
