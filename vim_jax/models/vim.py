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


class OutputHead(nn.Module):
  """Logits over the codebook, accumulated in float32 whatever the compute dtype.

  Its params are nn.Dense's ('kernel' [D, V], 'bias' [V]), so checkpoints are unchanged.
  """

  width: int
  vocab_size: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.kernel = self.param(
        "kernel", transformer.dense_init(("embed", "vocab")), (self.width, self.vocab_size)
    )
    self.bias = self.param("bias", transformer.zeros_init(("vocab",)), (self.vocab_size,))

  def __call__(self, h: jax.Array) -> jax.Array:
    """h [..., D] -> logits [..., V] float32."""
    return head_logits(h, self.kernel, self.bias, self.dtype)

  def cross_entropy(self, h: jax.Array, targets: jax.Array, chunk: int):
    """h [B, N, D], targets int [B, N] -> (nll [B, N], correct [B, N]) float32.

    The [B, chunk, V] float32 logits of one chunk of the sequence exist at a time, in the
    forward and the backward pass (each chunk's logits are recomputed for its gradient), so
    the loss never holds [B, N, V] (2 GiB per 64 sequences at N=1024, V=8192)."""
    return chunked_cross_entropy(h, self.kernel, self.bias, targets, chunk, self.dtype)


def head_logits(h, kernel, bias, dtype) -> jax.Array:
  logits = jnp.einsum(
      "...d,dv->...v", h.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32
  )
  return logits + bias.astype(jnp.float32)


def chunked_cross_entropy(h, kernel, bias, targets, chunk: int, dtype):
  """See OutputHead.cross_entropy; chunk = 0 (or >= N) is one chunk."""
  b, n, d = h.shape
  chunk = n if chunk <= 0 or chunk >= n else chunk
  if n % chunk:
    raise ValueError(
        f"model.loss_chunk={chunk} does not divide the {n} tokens per image; "
        "use a divisor of it (or 0 for the whole sequence)."
    )

  @jax.checkpoint  # saves only this chunk's inputs; its logits are recomputed for the gradient
  def one_chunk(h_chunk, t_chunk):
    logits = head_logits(h_chunk, kernel, bias, dtype)  # [B, chunk, V]
    label_logit = jnp.take_along_axis(logits, t_chunk[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logit
    correct = (jnp.argmax(logits, axis=-1) == t_chunk).astype(jnp.float32)
    return nll, correct

  split = lambda x: jnp.swapaxes(x.reshape(b, n // chunk, chunk, *x.shape[2:]), 0, 1)
  _, (nll, correct) = jax.lax.scan(
      lambda _, xs: (None, one_chunk(*xs)), None, (split(h), split(targets))
  )
  merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, n)
  return merge(nll), merge(correct)


class VIM(nn.Module):
  """Build with `VIM.from_config(config)`.

  Attributes:
    stack: the shared Transformer's sizes (causal).
    vocab_size: codebook size of the stage-1 tokenizer.
    num_tokens: N, tokens per image (1024 for 256 px, patch 8).
    num_classes: 0 for an unconditional model.
  """

  # No defaults: every field is the config's (configs/vim_*.py), one default per setting.
  stack: transformer.StackConfig
  vocab_size: int
  num_tokens: int
  num_classes: int
  condition_every_position: bool
  loss_chunk: int  # tokens per chunk of the training loss (see OutputHead)
  dtype: jnp.dtype

  @classmethod
  def from_config(
      cls, config: ml_collections.ConfigDict, vocab_size: int, num_tokens: int
  ) -> "VIM":
    m = config.model
    stack = transformer.StackConfig.from_config(m, causal=True)
    return cls(
        stack,
        vocab_size,
        num_tokens,
        m.num_classes,
        m.condition_every_position,
        m.loss_chunk,
        jnp.dtype(m.dtype),
    )

  @property
  def null_label(self) -> int:
    return self.num_classes

  def setup(self):
    width = self.stack.width
    embed_init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    self.token_embedding = nn.Embed(
        self.vocab_size, width, dtype=self.dtype, embedding_init=embed_init(("vocab", "embed"))
    )
    self.condition_embedding = nn.Embed(
        self.num_classes + 1,
        width,
        dtype=self.dtype,
        embedding_init=embed_init(("classes", "embed")),
    )
    self.position_embedding = self.param(
        "position_embedding", embed_init(("length", "embed")), (self.num_tokens, width)
    )
    self.transformer = transformer.Transformer(self.stack, self.dtype)
    self.head = OutputHead(width, self.vocab_size, self.dtype)

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
    return self.head(h)

  def loss(self, tokens: jax.Array, labels: jax.Array, deterministic: bool = True):
    """Per-example mean cross-entropy (nats) and next-token accuracy, both [B] float32, of
    tokens int [B, N] given labels [B]; equal to the cross-entropy of self(tokens, labels)
    without ever holding the [B, N, V] logits (see OutputHead.cross_entropy)."""
    labels = self._labels(labels, tokens.shape[0])
    h = self.transformer(self._inputs(tokens, labels), deterministic)
    nll, correct = self.head.cross_entropy(h, tokens, self.loss_chunk)
    return jnp.mean(nll, axis=-1), jnp.mean(correct, axis=-1)

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
    return self.head(h[:, 0])

  def _labels(self, labels: jax.Array | None, batch: int) -> jax.Array:
    if self.num_classes == 0 or labels is None:
      return jnp.zeros((batch,), jnp.int32)  # the single start token
    return labels.astype(jnp.int32)
