"""The one Transformer block stack shared by the ViT-VQGAN encoder, decoder and VIM.

Pre-LayerNorm blocks (LN -> attention -> residual, LN -> MLP -> residual) followed by a final
LayerNorm. The attention width (heads x head_dim) is independent of the model width, because
the paper's Large model has width 1280 but 16 heads of 64.

Every parameter carries logical axis names (see `vim_jax/infra/parallel.py` for the rules that map
them to mesh axes), and the residual stream is constrained to
('act_batch', 'act_length', 'act_embed') so that data, FSDP and tensor parallel layouts are
config changes.

Two layouts of the blocks' params, chosen by `StackConfig.scan_layers`:
  unrolled  transformer/block_00/..., block_01/...: a Python loop, one copy of the block's
            program per layer (compile time grows with depth);
  scanned   transformer/layers/block/... with a leading [num_layers] axis (logical axis
            'layers'): one block under nn.scan, compiled once. The paper configs use it.
Checkpoints of one layout do not load into the other; `infra/checkpoint.py` says so by name, and
`unstack_layers` turns scanned params into the unrolled layout (decoding uses it: see
`vim_jax/sampling/autoregressive.py`).
`remat_policy` picks what the backward pass recomputes: 'none', 'full' (the whole block) or
'minimal' (keep the matmul outputs without a batch dimension, i.e. recompute only the
elementwise work and attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vim_jax.models import attention as attention_lib

Dtype = Any

MLP_ACTIVATIONS = {"gelu": nn.gelu, "tanh": jnp.tanh}

# remat_policy name -> jax.checkpoint policy (None: no rematerialisation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """Sizes of one Transformer stack.

  num_heads * head_dim is the attention width; it need not equal `width`.
  """

  # Every option is the config's (configs/common.py: stack_kernels, block_options), with no
  # default here: one default per setting.
  num_layers: int
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float
  remat_policy: str  # see REMAT_POLICIES
  scan_layers: bool  # blocks under nn.scan (see the module docstring)
  attention: str  # kernel, see vim_jax/models/attention.py
  attention_block: int  # splash attention's tile size
  # Options that describe other published ViTs (e.g. enhancing-transformers' ViT-VQGAN, see
  # configs/enhancing_vitvq_*.py).
  mlp_activation: str  # 'gelu' (tanh approximation) or 'tanh'
  qkv_bias: bool  # biases on the query/key/value projections (the output's is kept)
  layer_norm_eps: float  # flax's default is 1e-6; PyTorch's is 1e-5
  causal: bool = False  # set by the model (VIM), not by a config

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"remat_policy={self.remat_policy!r}; expected one of {list(REMAT_POLICIES)}."
      )
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(
          f"attention={self.attention!r}; expected one of "
          f"{list(attention_lib.IMPLEMENTATIONS)}."
      )
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(
          f"mlp_activation={self.mlp_activation!r}; expected one of {list(MLP_ACTIVATIONS)}."
      )

  @classmethod
  def from_config(cls, cfg, causal: bool = False) -> "StackConfig":
    """From a config section with every stack key (configs: `common.vit_stack`, the stage-2
    `model`; runs saved before a key existed get it from runs.FIELDS_ADDED)."""
    return cls(
        num_layers=cfg.num_layers,
        width=cfg.width,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
        causal=causal,
        remat_policy=cfg.remat_policy,
        scan_layers=cfg.scan_layers,
        attention=cfg.attention,
        attention_block=cfg.attention_block,
        mlp_activation=cfg.mlp_activation,
        qkv_bias=cfg.qkv_bias,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def dense_init(axes):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def zeros_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(dtype: Dtype, name: str | None = None, epsilon: float = 1e-6) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon,
      dtype=dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=zeros_init(("embed",)),
      name=name,
  )


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Sharding hint for a token stream [B, L, D]."""
  return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class MultiHeadAttention(nn.Module):
  """Self-attention with its own attention width, and a KV cache for decoding.

  Kernels are plain params with 3-D logical axes and an einsum, because nn.DenseGeneral with
  3-D logical kernel axes fails under jax.set_mesh (flax 0.12).
  """

  num_heads: int
  head_dim: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  attention_block: int = 512
  qkv_bias: bool = True

  @nn.compact
  def __call__(
      self, x: jax.Array, decode_index: jax.Array | None = None, cache_length: int = 0
  ) -> jax.Array:
    """x: [B, L, D] -> [B, L, D].

    With decode_index (an int32 scalar), x holds the L tokens at positions
    decode_index .. decode_index + L - 1: their keys and values are written into the 'cache'
    collection ([B, cache_length, H, K]) and the queries attend to every cached position up to
    their own (causal decoding with a KV cache).
    """
    width = x.shape[-1]
    h, k = self.num_heads, self.head_dim

    def project(name):
      kernel = self.param(name + "_kernel", dense_init(("embed", "heads", "kv")), (width, h, k))
      y = jnp.einsum("bld,dhk->blhk", x, kernel.astype(self.dtype))
      if self.qkv_bias:
        y = y + self.param(name + "_bias", zeros_init(("heads", "kv")), (h, k)).astype(self.dtype)
      return nn.with_logical_constraint(y, ("act_batch", "act_length", "act_heads", "act_kv"))

    q, key, value = project("query"), project("key"), project("value")
    if decode_index is None:
      out = attention_lib.dot_product_attention(
          q,
          key,
          value,
          causal=self.causal,
          implementation=self.attention,
          block=self.attention_block,
      )
    else:
      out = self._attend_to_cache(q, key, value, decode_index, cache_length)
    out_kernel = self.param("out_kernel", dense_init(("heads", "kv", "embed")), (h, k, width))
    out_bias = self.param("out_bias", zeros_init(("embed",)), (width,))
    y = jnp.einsum("blhk,hkd->bld", out, out_kernel.astype(self.dtype))
    return y + out_bias.astype(self.dtype)

  def _attend_to_cache(self, q, key, value, decode_index, cache_length):
    """q, key, value [B, L, H, K] of the L tokens at decode_index.. -> [B, L, H, K].

    The 'cache' collection holds keys and values as [B, H, K, cache_length], positions minor:
    both products below then read the cache in place at memory speed (on CPU; on TPU a minor
    axis of K = 64 would also be padded to 128 lanes), where a [B, cache_length, H, K] cache
    makes XLA transpose every layer's cache at every token. Only the L new positions are
    written (dynamic_update_slice, in place in the decoding loop)."""
    b, length, h, k = q.shape
    shape = (b, h, k, cache_length)
    cached_key = self.variable("cache", "key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "value", jnp.zeros, shape, value.dtype)
    start = (0, 0, 0, decode_index)
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, jnp.einsum("blhk->bhkl", key), start
    )
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, jnp.einsum("blhk->bhkl", value), start
    )
    scale = jnp.asarray(1.0 / np.sqrt(k), q.dtype)
    logits = jnp.einsum(
        "blhk,bhkt->bhlt", q * scale, cached_key.value, preferred_element_type=jnp.float32
    )
    query_pos = decode_index + jnp.arange(length)
    mask = jnp.arange(cache_length)[None, :] <= query_pos[:, None]  # [L, cache_length]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhlt,bhkt->blhk", probs, cached_value.value)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  activation: str = "gelu"  # see MLP_ACTIVATIONS

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    width = x.shape[-1]
    y = nn.Dense(
        self.mlp_dim,
        dtype=self.dtype,
        kernel_init=dense_init(("embed", "mlp")),
        bias_init=zeros_init(("mlp",)),
        name="fc1",
    )(x)
    y = nn.with_logical_constraint(y, ("act_batch", "act_length", "act_mlp"))
    y = MLP_ACTIVATIONS[self.activation](y)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return nn.Dense(
        width,
        dtype=self.dtype,
        kernel_init=dense_init(("mlp", "embed")),
        bias_init=zeros_init(("embed",)),
        name="fc2",
    )(y)


class TransformerBlock(nn.Module):
  config: StackConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, deterministic: bool, decode_index=None, cache_length: int = 0
  ) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    cfg = self.config
    y = layer_norm(self.dtype, "ln_attention", cfg.layer_norm_eps)(x)
    y = MultiHeadAttention(
        cfg.num_heads,
        cfg.head_dim,
        cfg.causal,
        self.dtype,
        cfg.attention,
        cfg.attention_block,
        cfg.qkv_bias,
        name="attention",
    )(y, decode_index, cache_length)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    x = constrain_tokens(x + y)
    y = layer_norm(self.dtype, "ln_mlp", cfg.layer_norm_eps)(x)
    y = MlpBlock(cfg.mlp_dim, cfg.dropout, self.dtype, cfg.mlp_activation, name="mlp")(
        y, deterministic
    )
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    return constrain_tokens(x + y)


class ScannedBlock(nn.Module):
  """A TransformerBlock as one step of nn.scan over the layers.

  carry: (x [B, L, D], captured [B, L, D] or None); layer: this step's 0-based index (a
  scanned int32); decode_index: broadcast to every layer.
  """

  config: StackConfig
  dtype: Dtype
  deterministic: bool
  cache_length: int = 0
  capture_block: int | None = None

  @nn.compact
  def __call__(self, carry, layer, decode_index):
    x, captured = carry
    x = TransformerBlock(self.config, self.dtype, name="block")(
        x, self.deterministic, decode_index, self.cache_length
    )
    if captured is not None:  # keep the probe's block output as it passes
      captured = jnp.where(layer == self.capture_block - 1, x, captured)
    return (x, captured), None


class Transformer(nn.Module):
  """num_layers pre-LN blocks (unrolled or scanned) and a final LayerNorm."""

  config: StackConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      deterministic: bool = True,
      decode_index=None,
      cache_length: int = 0,
      capture_block: int | None = None,
  ):
    """x: [B, L, D] -> [B, L, D].

    decode_index / cache_length: KV-cached decoding (see MultiHeadAttention).
    capture_block: also return the output of that block (1-based, before the final LayerNorm),
    as (output, captured); used for linear probes.
    """
    cfg = self.config
    if capture_block is not None and not 1 <= capture_block <= cfg.num_layers:
      raise ValueError(f"capture_block={capture_block}; expected 1..{cfg.num_layers}.")
    # Decoding never differentiates, so it never rematerialises.
    policy = REMAT_POLICIES[cfg.remat_policy] if decode_index is None else None
    x = constrain_tokens(x.astype(self.dtype))
    if cfg.scan_layers:
      x, captured = self._scanned(
          x, deterministic, decode_index, cache_length, capture_block, policy
      )
    else:
      x, captured = self._unrolled(
          x, deterministic, decode_index, cache_length, capture_block, policy
      )
    out = layer_norm(self.dtype, "ln_final", cfg.layer_norm_eps)(x)
    return out if capture_block is None else (out, captured)

  def _unrolled(self, x, deterministic, decode_index, cache_length, capture_block, policy):
    block_cls = TransformerBlock
    if policy is not None:
      block_cls = nn.remat(TransformerBlock, static_argnums=(2, 4), policy=policy)
    captured = None
    for i in range(self.config.num_layers):
      x = block_cls(self.config, self.dtype, name=f"block_{i:02d}")(
          x, deterministic, decode_index, cache_length
      )
      if capture_block == i + 1:
        captured = x
    return x, captured

  def _scanned(self, x, deterministic, decode_index, cache_length, capture_block, policy):
    block_cls = ScannedBlock
    if policy is not None:
      block_cls = nn.remat(ScannedBlock, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},  # each layer its own init and dropout
        in_axes=(0, nn.broadcast),
        length=self.config.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    captured = None if capture_block is None else jnp.zeros_like(x)
    (x, captured), _ = scanned(
        self.config, self.dtype, deterministic, cache_length, capture_block, name="layers"
    )((x, captured), jnp.arange(self.config.num_layers, dtype=jnp.int32), decode_index)
    return x, captured


def unstack_layers(params: dict, num_layers: int) -> dict:
  """A Transformer's params in the scanned layout ('layers/block/...' with a leading
  [num_layers] axis) -> the same values in the unrolled layout ('block_00/...', ...).

  Decoding runs the unrolled layout: with the layers under nn.scan, every decoded token
  sliced each layer's cache out of a stacked [num_layers, ...] buffer and wrote it back into a
  new one, moving the whole KV cache several times per token instead of one position."""
  if "layers" not in params:
    raise ValueError(
        f"expected scanned Transformer params (a 'layers' entry); got {sorted(params)}."
    )
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    unrolled[f"block_{i:02d}"] = jax.tree.map(lambda p, i=i: p[i], params["layers"]["block"])
  return unrolled
