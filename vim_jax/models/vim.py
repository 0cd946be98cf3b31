"""VIM: the decoder-only Transformer over image tokens (stage 2).

The sequence for an image with tokens t_0 .. t_{N-1} (raster order) is
  [c, t_0, ..., t_{N-2}]  ->  predicts  [t_0, ..., t_{N-1}]
where c is the embedding of the class label (class-conditional) or of a start token
(unconditional). The condition table has num_classes + 1 rows; the last row is the "null"
condition, used for label dropout during training and for the unconditional half of
classifier-free guidance.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vim_jax.models import transformer


class VIM(nn.Module):
  """Build with `VIM.from_config(config)`.

  Attributes:
    stack: the shared Transformer's sizes (causal).
    vocab_size: codebook size of the stage-1 tokenizer.
    num_tokens: N, tokens per image (1024 for 256 px, patch 8).
    num_classes: 0 for an unconditional model.
  """

  stack: transformer.StackConfig
  vocab_size: int
  num_tokens: int
  num_classes: int = 0
  condition_every_position: bool = False
  dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int,
                  num_tokens: int) -> "VIM":
    m = config.model
    stack = transformer.StackConfig(
        num_layers=m.num_layers, width=m.width, num_heads=m.num_heads, head_dim=m.head_dim,
        mlp_dim=m.mlp_dim, dropout=m.dropout, causal=True, remat=m.remat)
    return cls(stack, vocab_size, num_tokens, m.num_classes,
               m.get("condition_every_position", False), jnp.dtype(m.dtype))

  @property
  def null_label(self) -> int:
    return self.num_classes

  def setup(self):
    width = self.stack.width
    embed_init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    self.token_embedding = nn.Embed(self.vocab_size, width, dtype=self.dtype,
                                    embedding_init=embed_init(("vocab", "embed")))
    self.condition_embedding = nn.Embed(self.num_classes + 1, width, dtype=self.dtype,
                                        embedding_init=embed_init(("classes", "embed")))
    self.position_embedding = self.param("position_embedding", embed_init(("length", "embed")),
                                         (self.num_tokens, width))
    self.transformer = transformer.Transformer(self.stack, self.dtype)
    self.head = nn.Dense(self.vocab_size, dtype=self.dtype,
                         kernel_init=transformer.dense_init(("embed", "vocab")),
                         bias_init=transformer.zeros_init(("vocab",)))

  def _inputs(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    """[B, N] tokens, [B] labels -> [B, N, D] shifted input embeddings with positions."""
    cond = self.condition_embedding(labels)[:, None]
    x = jnp.concatenate([cond, self.token_embedding(tokens[:, :-1])], axis=1)
    if self.condition_every_position:
      x = x + cond
    return x + self.position_embedding.astype(self.dtype)

  def __call__(self, tokens: jax.Array, labels: jax.Array, deterministic: bool = True) -> jax.Array:
    """tokens int [B, N], labels int [B] (ignored when unconditional) -> logits [B, N, V] f32."""
    labels = self._labels(labels, tokens.shape[0])
    h = self.transformer(self._inputs(tokens, labels), deterministic)
    return self.head(h).astype(jnp.float32)

  def features(self, tokens: jax.Array, labels: jax.Array, block: int) -> jax.Array:
    """Linear-probe features: the output of `block` (1-based) averaged over the sequence.

    tokens [B, N], labels [B] -> [B, D] float32.
    """
    labels = self._labels(labels, tokens.shape[0])
    _, captured = self.transformer(self._inputs(tokens, labels), True, capture_block=block)
    return jnp.mean(captured.astype(jnp.float32), axis=1)

  def decode(self, previous_tokens: jax.Array, labels: jax.Array, index: jax.Array) -> jax.Array:
    """One KV-cached step: logits [B, V] for the token at position `index`.

    previous_tokens: [B] the token at index - 1 (ignored at index 0, where the condition is
    the input); labels: [B]; index: int32 scalar in [0, N).
    """
    labels = self._labels(labels, previous_tokens.shape[0])
    cond = self.condition_embedding(labels)
    x = jnp.where(index == 0, cond, self.token_embedding(previous_tokens))
    if self.condition_every_position:
      x = x + cond
    x = x[:, None]
    position = jax.lax.dynamic_slice_in_dim(self.position_embedding, index, 1, axis=0)
    x = x + position.astype(self.dtype)[None]
    h = self.transformer(x, True, decode_index=index, cache_length=self.num_tokens)
    return self.head(h[:, 0]).astype(jnp.float32)

  def _labels(self, labels: jax.Array | None, batch: int) -> jax.Array:
    if self.num_classes == 0 or labels is None:
      return jnp.zeros((batch,), jnp.int32)  # the single start token
    return labels.astype(jnp.int32)
