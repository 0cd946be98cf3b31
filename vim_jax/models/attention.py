"""Scaled dot-product attention with a choice of kernel: XLA, cuDNN flash attention, or Pallas
splash attention (TPU).

  config.model.attention (stage 2) / model.encoder.attention, model.decoder.attention (stage 1):
    'auto'    splash on TPU (when the sequence length is a multiple of 128, and the arrays
              are on one device or a mesh is set, as the trainers do); cuDNN on GPU when the
              compute dtype is bfloat16 or float16; XLA elsewhere. The default.
    'xla'     jax.nn.dot_product_attention(implementation='xla'): writes the float32
              [B, H, L, L] scores to memory.
    'cudnn'   jax.nn.dot_product_attention(implementation='cudnn'): fused, GPU only, bf16/fp16.
    'splash'  jax.experimental.pallas splash attention: fused, TPU only. It runs per example
              under jax.shard_map with the batch split over (data, fsdp) and the heads over
              tensor, with `block` x `block` tiles (the library's default of 128 is slow).

Asking for 'cudnn' off GPU or 'splash' off TPU is an error, except that tests may run splash
in Pallas interpret mode on any backend (`pallas_interpret()`).
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")

# Set by pallas_interpret(): run splash through the Pallas interpreter (any backend; slow).
_interpret = False
# Set by xla_only(): every kernel choice resolves to XLA (for counting a step's FLOPs).
_xla_only = False
# Name scope of causal attention's matmuls: vim_jax/infra/flops.py counts them at half (the masked
# half is no model work, and the fused kernels skip it).
CAUSAL_SCOPE = "causal_attention"


@contextlib.contextmanager
def pallas_interpret():
  """Test-only: splash attention runs in Pallas interpret mode, so it works on CPU."""
  global _interpret
  previous, _interpret = _interpret, True
  try:
    yield
  finally:
    _interpret = previous


@contextlib.contextmanager
def xla_only():
  """Traces inside use XLA attention whatever the config says: its matmuls are visible to
  vim_jax/infra/flops.py, a fused kernel's are not."""
  global _xla_only
  previous, _xla_only = _xla_only, True
  try:
    yield
  finally:
    _xla_only = previous


def resolve(
    implementation: str,
    dtype,
    backend: str | None = None,
    length: int = 128,
    splash_can_shard: bool = True,
) -> str:
  """The kernel `implementation` means on `backend` (default: jax's) for compute `dtype`
  and sequence `length`. splash_can_shard: one device runs it all, or a mesh is set whose
  batch axes divide the batch and whose tensor axis divides the heads (splash is a Mosaic
  kernel, which XLA cannot partition by itself; an init on one example takes XLA).

  Raises ValueError for an unknown name, and for 'cudnn' off GPU or 'splash' off TPU.
  """
  backend = backend or jax.default_backend()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r}; expected one of {list(IMPLEMENTATIONS)}.")
  if _xla_only:
    return "xla"
  if implementation == "auto":
    if backend == "tpu":
      return "splash" if length % 128 == 0 and splash_can_shard else "xla"
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      return "cudnn"
    return "xla"
  if implementation == "cudnn" and backend not in ("gpu", "cuda"):
    raise ValueError(
        f"attention='cudnn' needs an NVIDIA GPU, but jax's backend is {backend!r};"
        " use attention='auto' or 'xla'."
    )
  if implementation == "splash" and backend != "tpu" and not _interpret:
    raise ValueError(
        f"attention='splash' is a TPU (Pallas Mosaic) kernel, but jax's backend "
        f"is {backend!r}; use attention='auto' or 'xla'."
    )
  return implementation


def splash_block_size(length: int, block: int) -> int:
  """The largest tile <= block that divides `length` and is a multiple of 128 (Mosaic's lane
  width); splash cannot run a sequence that 128 does not divide."""
  for size in range(min(block, length) // 128 * 128, 0, -128):
    if length % size == 0:
      return size
  raise ValueError(
      f"splash attention needs a sequence length divisible by 128, got {length}; "
      "use attention='xla' for this model."
  )


def _splash_kernel(num_heads: int, length: int, causal: bool, block: int, interpret: bool):
  """Built inside each trace: the kernel holds its mask tables as arrays, which a cached
  kernel would leak from the trace that made it into the next."""
  from jax.experimental.pallas.ops.tpu import (  # lazy: Pallas TPU kernels, used on TPU only
      splash_attention as splash,
  )

  mask_cls = splash.CausalMask if causal else splash.FullMask
  mask = splash.MultiHeadMask([mask_cls((length, length)) for _ in range(num_heads)])
  b = splash_block_size(length, block)
  sizes = splash.BlockSizes(
      block_q=b,
      block_kv=b,
      block_kv_compute=b,
      block_q_dkv=b,
      block_kv_dkv=b,
      block_kv_dkv_compute=b,
      block_q_dq=b,
      block_kv_dq=b,
  )
  return splash.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, block: int) -> jax.Array:
  """q, k, v [B, L, H, K] -> [B, L, H, K], splash per example, sharded when a mesh is set."""
  scale = 1.0 / math.sqrt(q.shape[-1])  # splash does not scale the logits itself

  def per_shard(q, k, v):
    kernel = _splash_kernel(q.shape[2], q.shape[1], causal, block, _interpret)
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, L, K], splash's layout
    out = jax.vmap(kernel)(
        to_heads_first(q * jnp.asarray(scale, q.dtype)), to_heads_first(k), to_heads_first(v)
    )
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return per_shard(q, k, v)
  # Batch over the data-parallel axes, heads over tensor: each device runs whole sequences.
  spec = P(("data", "fsdp"), None, "tensor", None)
  return jax.shard_map(
      per_shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
  )(q, k, v)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    implementation: str = "auto",
    block: int = 512,
) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v with the softmax in float32.

  q, k, v: [B, L, H, K] -> [B, L, H, K]. implementation: see the module docstring; block is
  splash's tile size.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # The kernel is chosen for the chips the program is compiled for: the mesh's, which are not
  # jax's default backend when compiling for a TPU slice from another machine.
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  backend = getattr(device, "platform", None)
  if mesh.empty:
    splash_can_shard = jax.device_count() == 1
  else:  # whole sequences per device: the batch over (data, fsdp), the heads over tensor
    sizes = dict(mesh.shape)
    splash_can_shard = (
        q.shape[0] % (sizes.get("data", 1) * sizes.get("fsdp", 1)) == 0
        and q.shape[2] % sizes.get("tensor", 1) == 0
    )
  kind = resolve(
      implementation, q.dtype, backend=backend, length=q.shape[1], splash_can_shard=splash_can_shard
  )
  if kind == "splash":
    return _splash(q, k, v, causal, block)
  with jax.named_scope(CAUSAL_SCOPE if causal else "attention"):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=kind)
