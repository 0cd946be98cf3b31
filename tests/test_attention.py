"""Attention kernels: splash (in Pallas interpret mode, so it runs on CPU) against XLA's
attention, every kernel in bfloat16 (cuDNN where a GPU is present) against a float64 reference
within what bf16 rounding explains, the 'auto' choice per backend, and the errors for a kernel
the backend lacks."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stacks

from vim_jax.infra import parallel
from vim_jax.models import attention, transformer


def qkv(batch, length, heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.float32) for k in keys]


def attention_and_grads(fn, q, k, v):
  """Outputs and the gradients w.r.t. q, k, v of a loss that weighs every output."""
  weights = jax.random.normal(jax.random.key(9), q.shape)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("head_dim", [64, 96], ids=["head64", "head96"])  # ViT-VQGAN/VIM-L, VIM-B
def test_splash_equals_xla_outputs_and_gradients(causal, head_dim):
  q, k, v = qkv(1, 256, 2, head_dim)
  xla = lambda q, k, v: attention.dot_product_attention(
      q, k, v, causal=causal, implementation="xla"
  )
  with attention.pallas_interpret():
    splash = jax.jit(
        lambda q, k, v: attention.dot_product_attention(
            q, k, v, causal=causal, implementation="splash", block=128
        )
    )
    out_s, grads_s = attention_and_grads(splash, q, k, v)
  out_x, grads_x = attention_and_grads(xla, q, k, v)
  np.testing.assert_allclose(out_s, out_x, rtol=1e-5, atol=1e-5)
  for name, gs, gx in zip("qkv", grads_s, grads_x):
    np.testing.assert_allclose(
        gs,
        gx,
        rtol=1e-4,
        atol=1e-4 * float(jnp.max(jnp.abs(gx))),
        err_msg=f"gradient w.r.t. {name}",
    )


def test_splash_under_shard_map_on_a_mesh_equals_xla():
  """With a (data 2, fsdp 2, tensor 2) mesh set, splash runs under shard_map (batch over
  data x fsdp, heads over tensor) and still equals XLA's attention."""
  mesh = parallel.create_mesh(dict(data=2, fsdp=2, tensor=2))
  q, k, v = qkv(4, 128, 2, 64, seed=1)
  expected = attention.dot_product_attention(q, k, v, causal=True, implementation="xla")
  spec = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
  )
  with attention.pallas_interpret(), jax.set_mesh(mesh):
    fn = jax.jit(
        lambda q, k, v: attention.dot_product_attention(
            q, k, v, causal=True, implementation="splash", block=128
        )
    )
    lowered = fn.lower(*[jax.device_put(x, spec) for x in (q, k, v)])
    out = lowered.compile()(*[jax.device_put(x, spec) for x in (q, k, v)])
  assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_a_transformer_with_splash_equals_one_with_xla():
  config = stacks.stack(
      num_layers=2,
      width=64,
      num_heads=2,
      head_dim=64,
      mlp_dim=128,
      causal=True,
      scan_layers=True,
      attention="xla",
      attention_block=128,
  )
  x = jax.random.normal(jax.random.key(0), (2, 128, 64))
  xla_stack = transformer.Transformer(config)
  params = nn.meta.unbox(xla_stack.init(jax.random.key(1), x))["params"]
  splash_stack = transformer.Transformer(dataclasses.replace(config, attention="splash"))
  with attention.pallas_interpret():
    out = jax.jit(lambda p: splash_stack.apply({"params": p}, x))(params)
  np.testing.assert_allclose(out, xla_stack.apply({"params": params}, x), rtol=1e-4, atol=1e-4)


def test_auto_picks_splash_on_tpu_cudnn_for_half_precision_on_gpu_else_xla():
  assert attention.resolve("auto", jnp.bfloat16, "tpu") == "splash"
  assert attention.resolve("auto", jnp.float32, "tpu") == "splash"
  assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float16, "gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, "gpu") == "xla"
  assert attention.resolve("auto", jnp.bfloat16, "cpu") == "xla"
  assert attention.resolve("xla", jnp.bfloat16, "tpu") == "xla"
  # Splash needs a multiple of 128 tokens, and a mesh (or one device) to run under.
  assert attention.resolve("auto", jnp.bfloat16, "tpu", length=64) == "xla"
  assert attention.resolve("auto", jnp.bfloat16, "tpu", splash_can_shard=False) == "xla"


def test_a_kernel_the_backend_lacks_is_a_clear_error():
  with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU.*'cpu'"):
    attention.resolve("cudnn", jnp.bfloat16, "cpu")
  with pytest.raises(ValueError, match="attention='splash' is a TPU .* backend is 'cpu'"):
    attention.resolve("splash", jnp.bfloat16, "cpu")
  with attention.pallas_interpret():
    assert attention.resolve("splash", jnp.bfloat16, "cpu") == "splash"
  with pytest.raises(ValueError, match="expected one of"):
    attention.resolve("flash", jnp.bfloat16, "cpu")
  with pytest.raises(ValueError, match="expected one of"):
    stacks.stack(num_layers=1, width=8, num_heads=1, head_dim=8, mlp_dim=8, attention="flash")


def test_splash_tiles_divide_the_sequence():
  assert attention.splash_block_size(1024, 512) == 512
  assert attention.splash_block_size(256, 512) == 256
  assert attention.splash_block_size(384, 512) == 384
  assert attention.splash_block_size(640, 512) == 128
  with pytest.raises(ValueError, match="divisible by 128, got 64"):
    attention.splash_block_size(64, 512)


BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16's 8-bit significand: round to nearest within 2^-8


def bf16_attention_reference(q, k, v, causal: bool, q_prescaled_in_bf16: bool):
  """The float64 attention of bfloat16 inputs q, k, v [B, L, H, K], and an elementwise bound
  on what bfloat16 rounding explains in a kernel that, like XLA's, cuDNN's and splash's, takes
  the q k^T products and the softmax in float32, with u = 2^-8:
  - probabilities P rounded to bf16 before P v (XLA, cuDNN; splash keeps them float32): each
    P_j within u P_j, so the output within u sum_j P_j |v_j|;
  - the output rounded to bf16: within u |o|;
  - with q_prescaled_in_bf16 (splash: this repo multiplies q by bf16(1 / sqrt(K)) before the
    kernel), unless 1 / sqrt(K) is a power of two: q's scale and product each rounded, so
    logit s_j within e_j = 2u sum_d |q_d k_jd| / sqrt(K), and to first order the output within
    sum_j P_j e_j |v_j - o|.
  float32 accumulation (2^-24 per add) is far below these. Returns (o, bound), [B, L, H, K]."""
  q, k, v = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (q, k, v))
  length, scale = q.shape[1], 1 / np.sqrt(q.shape[-1])
  logits = np.einsum("blhd,bmhd->bhlm", q, k) * scale
  if causal:
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhlm,bmhd->blhd", p, v)
  bound = BF16_UNIT_ROUNDOFF * (np.einsum("bhlm,bmhd->blhd", p, np.abs(v)) + np.abs(o))
  if q_prescaled_in_bf16 and np.log2(scale) % 1:
    e = 2 * BF16_UNIT_ROUNDOFF * scale * np.einsum("blhd,bmhd->bhlm", np.abs(q), np.abs(k))
    spread = np.abs(v.transpose(0, 2, 1, 3)[:, :, None] - o.transpose(0, 2, 1, 3)[:, :, :, None])
    bound += np.einsum("bhlm,bhlmd->blhd", p * e, spread)  # spread: |v_m - o_l| [B, H, L, L, K]
  return o, bound


@pytest.mark.parametrize(
    "implementation, head_dim, causal",
    [
        ("xla", 64, True),
        ("xla", 64, False),
        ("splash", 64, True),
        ("splash", 64, False),
        ("splash", 96, True),
        ("cudnn", 64, True),
        ("cudnn", 64, False),
    ],
)
def test_bfloat16_attention_is_within_what_bfloat16_rounding_explains(
    implementation, head_dim, causal
):
  """Each kernel in bfloat16 against the float64 attention of the same (bf16) inputs, within
  the elementwise bound bf16_attention_reference derives (the rounding of the probabilities
  and the output, and for splash of q's pre-scaling): a kernel that, say, rounded its logits to
  bf16, or scaled q and k by K^-1/4 each in bf16, fails (3-9 x this bound here).
  Splash runs in Pallas interpret mode; cuDNN only where jax's backend is an NVIDIA GPU."""
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    pytest.skip(
        "cuDNN attention needs an NVIDIA GPU as jax's backend, and this run's is "
        f"{jax.default_backend()!r} (the suite sets JAX_PLATFORMS=cpu unless it is "
        "already set: run with JAX_PLATFORMS=cuda on a GPU machine to include it)"
    )
  q, k, v = qkv(1, 128, 2, head_dim, seed=3)
  # Logits of standard deviation 3, a sharp attention like a trained model's, where an error in
  # the logits moves the output most.
  q, k, v = (x.astype(jnp.bfloat16) for x in (3 * q, k, v))
  with attention.pallas_interpret():
    out = jax.jit(
        lambda q, k, v: attention.dot_product_attention(
            q, k, v, causal=causal, implementation=implementation, block=128
        )
    )(q, k, v)
  assert out.dtype == jnp.bfloat16
  expected, bound = bf16_attention_reference(q, k, v, causal, implementation == "splash")
  ratio = np.abs(np.asarray(out.astype(jnp.float32), np.float64) - expected) / bound
  print(f"\n{implementation} bf16, head_dim {head_dim}: worst error {ratio.max():.2f} x the bound")
  assert ratio.max() <= 1.0, np.unravel_index(np.argmax(ratio), ratio.shape)
