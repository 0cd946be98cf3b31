"""Scanned vs unrolled Transformer stacks, and the remat policies: the same function.

A scanned stack on the unrolled stack's weights (stacked along a new leading axis) must give
the same outputs, gradients, KV-cached decoding and captured block; every remat policy must
give the plain stack's outputs and gradients, with dropout on.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stacks

from vim_jax.infra import checkpoint, parallel
from vim_jax.models import transformer

CONFIG = stacks.stack(num_layers=3, width=32, num_heads=2, head_dim=16, mlp_dim=64, causal=True)


def scanned_params(unrolled: dict, num_layers: int) -> dict:
  """The unrolled layout's params (block_00, block_01, ...) restacked for scan_layers=True."""
  blocks = [unrolled[f"block_{i:02d}"] for i in range(num_layers)]
  rest = {k: v for k, v in unrolled.items() if not k.startswith("block_")}
  return {**rest, "layers": {"block": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}}


def assert_trees_close(a, b, rtol=1e-5):
  largest = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * largest)


@pytest.fixture(scope="module")
def stacks():
  unrolled = transformer.Transformer(CONFIG)
  scanned = transformer.Transformer(dataclasses.replace(CONFIG, scan_layers=True))
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  params = nn.meta.unbox(unrolled.init(jax.random.key(1), x))["params"]
  return unrolled, scanned, x, params, scanned_params(params, CONFIG.num_layers)


def test_scanned_params_carry_a_layers_axis_and_match_the_restacked_layout(stacks):
  _, scanned, x, params, restacked = stacks
  boxed = scanned.init(jax.random.key(1), x)["params"]
  kernel = boxed["layers"]["block"]["attention"]["query_kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv")
  assert jax.tree.map(np.shape, nn.meta.unbox(boxed)) == jax.tree.map(np.shape, restacked)
  spec = nn.get_partition_spec(boxed)["layers"]["block"]["attention"]["query_kernel"]
  assert nn.logical_to_mesh_axes(spec, parallel.DEFAULT_AXIS_RULES) == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None
  )


def test_scanned_equals_unrolled_forward_gradient_and_captured_block(stacks):
  unrolled, scanned, x, params, restacked = stacks

  def loss(model, p):
    out, captured = model.apply({"params": p}, x, capture_block=2)
    return jnp.sum(out**2) + jnp.sum(jnp.sin(captured)), (out, captured)

  (value_u, (out_u, cap_u)), grads_u = jax.value_and_grad(
      lambda p: loss(unrolled, p), has_aux=True
  )(params)
  (value_s, (out_s, cap_s)), grads_s = jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True)(
      restacked
  )
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cap_s, cap_u, rtol=1e-5, atol=1e-5)
  assert float(value_s) == pytest.approx(float(value_u), rel=1e-5)
  assert_trees_close(scanned_params(grads_u, CONFIG.num_layers), grads_s)


def test_scanned_kv_cached_decoding_equals_unrolled(stacks):
  """Feeding the tokens one at a time through a stacked [layers, B, H, K, L] cache gives the
  unrolled stack's full-sequence outputs."""
  unrolled, scanned, x, params, restacked = stacks
  full = unrolled.apply({"params": params}, x)
  length = x.shape[1]
  cache = scanned.init(
      jax.random.key(0), x[:, :1], decode_index=jnp.zeros((), jnp.int32), cache_length=length
  )["cache"]
  # [layers, B, H, K, positions]: heads-major, positions minor (see _attend_to_cache)
  assert jax.tree.leaves(cache)[0].shape == (CONFIG.num_layers, 2, 2, 16, length)
  outs = []
  for i in range(length):
    out, mutated = scanned.apply(
        {"params": restacked, "cache": cache},
        x[:, i : i + 1],
        decode_index=jnp.asarray(i, jnp.int32),
        cache_length=length,
        mutable=["cache"],
    )
    cache = mutated["cache"]
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_policies_change_neither_outputs_nor_gradients(scan):
  """Every remat policy recomputes the same values in the backward pass, with dropout on (the
  recomputation must draw the same masks)."""
  config = dataclasses.replace(CONFIG, dropout=0.1, scan_layers=scan)
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  plain = transformer.Transformer(config)
  params = nn.meta.unbox(plain.init(jax.random.key(1), x))["params"]

  def run(policy):
    model = transformer.Transformer(dataclasses.replace(config, remat_policy=policy))
    f = lambda p: jnp.sum(
        model.apply({"params": p}, x, False, rngs={"dropout": jax.random.key(2)}) ** 2
    )
    return jax.value_and_grad(f)(params)

  value, grads = run("none")
  for policy in ("full", "minimal"):
    value_p, grads_p = run(policy)
    assert float(value_p) == pytest.approx(float(value), rel=1e-6)
    assert_trees_close(grads, grads_p)


def test_scanned_layers_draw_their_own_dropout_masks():
  """With every layer's weights equal, layers sharing one dropout mask would make the scanned
  stack equal to a scan that does not split the dropout rng; it must differ from it, while the
  same rng reproduces the same output."""
  config = dataclasses.replace(CONFIG, dropout=0.5, scan_layers=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  model = transformer.Transformer(config)
  params = nn.meta.unbox(model.init(jax.random.key(1), x))["params"]
  same = jax.tree.map(
      lambda p: jnp.broadcast_to(p[:1], p.shape), params["layers"]
  )  # every layer = layer 0
  params = {**params, "layers": same}
  run = lambda rng: model.apply({"params": params}, x, False, rngs={"dropout": rng})
  np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))

  class SharedMaskScan(nn.Module):  # what a scan without split_rngs={'dropout': True} does

    @nn.compact
    def __call__(self, x):
      scanned = nn.scan(
          transformer.ScannedBlock,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": False},
          in_axes=(0, nn.broadcast),
          length=config.num_layers,
      )
      (x, _), _ = scanned(config, jnp.float32, False, name="layers")(
          (x, None), jnp.arange(config.num_layers), None
      )
      return transformer.layer_norm(jnp.float32, "ln_final")(x)

  shared = SharedMaskScan().apply({"params": params}, x, rngs={"dropout": jax.random.key(3)})
  assert float(jnp.max(jnp.abs(shared - run(jax.random.key(3))))) > 1e-3


def test_a_checkpoint_of_the_other_layout_is_refused_by_name(tmp_path, stacks):
  """Resuming with the other scan_layers names scan_layers and leaves the checkpoint alone."""
  _, _, _, params, restacked = stacks
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": params}, force=True)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
      ),
      {"params": restacked},
  )
  with pytest.raises(
      checkpoint.CheckpointLayoutError,
      match=r"(?s)unrolled \(scan_layers=False\).*scan_layers to match",
  ):
    ckpt.restore_latest(abstract)
  assert (tmp_path / "checkpoints" / "1").exists()
  assert not (tmp_path / "checkpoints" / "corrupt").exists()


def test_a_checkpoint_of_another_model_size_is_refused_not_set_aside(tmp_path, stacks):
  """Scanned stacks of another depth have the same key paths; the shapes tell them apart, and
  the checkpoint is a config mismatch, not corruption."""
  _, _, _, _, restacked = stacks
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": restacked}, force=True)
  deeper = jax.tree.map(
      lambda a: jnp.concatenate([a, a[:1]]) if a.ndim and a.shape[0] == 3 else a, restacked
  )
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
      ),
      {"params": deeper},
  )
  with pytest.raises(
      checkpoint.CheckpointLayoutError,
      match=r"other shapes .*\(3, 32\) saved, \(4, 32\) wanted",
  ):
    ckpt.restore_latest(abstract)
  assert (tmp_path / "checkpoints" / "1").exists()
