"""ViT-VQGAN: ViT encoder, factorized l2-normalized quantizer, ViT decoder (stage 1).

Images are in [-1, 1], shape [B, H, W, 3]. With patch size p the token grid is
h x w = H/p x W/p. The decoder predicts p*p*3 values per token, or p*p*6 when the logit-Laplace
loss is on: a location mu and a log-scale log b per pixel channel, both in logit space; the
reconstruction is then sigmoid(mu) mapped back to [-1, 1].

Options that describe other published ViT-VQGANs (configs/enhancing_vitvq_*.py), each a field
of the config's `model` section; the defaults are the paper's:
  position_embedding  'learned' (a [N, D] parameter) or 'sincos' (fixed 2-D sin-cos table, see
                      sincos_position_embedding; no parameter)
  output_ffn          True: the Linear-tanh-Linear head after each stack (paper Sec. 3.1);
                      False: the encoder's stack feeds `to_code` directly and the decoder maps
                      each token to its p*p pixels with one linear layer (`to_pixels`)
  pixel_range         'minus_one_to_one' or 'zero_to_one': the range the network itself works
                      in. Callers always pass and get [-1, 1]; with 'zero_to_one' the encoder
                      sees (x + 1) / 2 and the plain (not logit-Laplace) output y is returned
                      as 2 y - 1.
and, per stack (transformer.StackConfig), mlp_activation, qkv_bias and layer_norm_eps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vim_jax.models import quantizer as quantizer_lib
from vim_jax.models import transformer

Dtype = Any


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C] in raster order."""
  b, height, width, c = images.shape
  p = patch_size
  x = images.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (height // p) * (width // p), p * p * c)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """[B, h*w, p*p*C] -> [B, h*p, w*p, C]; inverse of patchify."""
  b, _, d = tokens.shape
  h, w = grid
  p = patch_size
  c = d // (p * p)
  x = tokens.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def logit_laplace_reconstruction(mu: jax.Array, eps: float) -> jax.Array:
  """Mean image in [-1, 1] from logit-space locations mu (inputs were squashed by eps)."""
  x01 = (jax.nn.sigmoid(mu.astype(jnp.float32)) - eps) / (1.0 - 2.0 * eps)
  return jnp.clip(x01, 0.0, 1.0) * 2.0 - 1.0


class OutputFFN(nn.Module):
  """Linear-tanh-Linear head at the output of a stack (paper Sec. 3.1)."""

  hidden_dim: int
  out_dim: int
  out_axis: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, D] -> [B, L, out_dim]."""
    x = nn.Dense(
        self.hidden_dim,
        dtype=self.dtype,
        kernel_init=transformer.dense_init(("embed", "mlp")),
        bias_init=transformer.zeros_init(("mlp",)),
        name="hidden",
    )(x)
    x = jnp.tanh(x)
    return nn.Dense(
        self.out_dim,
        dtype=self.dtype,
        kernel_init=transformer.dense_init(("mlp", self.out_axis)),
        bias_init=transformer.zeros_init((self.out_axis,)),
        name="out",
    )(x)


POSITION_EMBEDDINGS = ("learned", "sincos")
PIXEL_RANGES = ("minus_one_to_one", "zero_to_one")


def sincos_position_embedding(grid: tuple[int, int], width: int) -> np.ndarray:
  """Fixed 2-D sin-cos table [h*w, width] float32 for tokens in raster order (row r, column c).

  With Q = width / 4 and w_k = 10000^(-k / Q), k < Q, token (r, c) gets
  [sin(c w), cos(c w), sin(r w), cos(r w)]: the column's half first (MAE's
  get_2d_sincos_pos_embed, as enhancing-transformers uses it). Computed in float64.
  """
  if width % 4:
    raise ValueError(f"a sin-cos position embedding needs a width divisible by 4, got {width}.")
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(
      np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij"
  )
  parts = []
  for coordinate in (cols.reshape(-1), rows.reshape(-1)):
    angles = coordinate[:, None] * omega[None, :]
    parts += [np.sin(angles), np.cos(angles)]
  return np.concatenate(parts, axis=1).astype(np.float32)


def position_embedding(
    module: nn.Module, kind: str, grid: tuple[int, int], width: int
) -> jax.Array:
  """[h*w, width]: a learned parameter or the fixed sin-cos table (see the module docstring)."""
  if kind == "sincos":
    return jnp.asarray(sincos_position_embedding(grid, width))
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed"))
  return module.param("position_embedding", init, (grid[0] * grid[1], width))


class Encoder(nn.Module):
  """Patch embedding, position embedding, Transformer, output FFN, factorized projection."""

  stack: transformer.StackConfig
  patch_size: int
  grid: tuple[int, int]
  code_dim: int
  output_ffn_dim: int  # 0: no output FFN
  dtype: Dtype
  position_embedding: str

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """images: [B, H, W, 3] (in the network's pixel range) -> latents [B, N, code_dim] float32."""
    width = self.stack.width
    x = patchify(images.astype(self.dtype), self.patch_size)
    x = nn.Dense(
        width,
        dtype=self.dtype,
        kernel_init=transformer.dense_init(("patch", "embed")),
        bias_init=transformer.zeros_init(("embed",)),
        name="patch_embedding",
    )(x)
    x = x + position_embedding(self, self.position_embedding, self.grid, width).astype(self.dtype)
    x = transformer.Transformer(self.stack, self.dtype, name="transformer")(x, deterministic)
    if self.output_ffn_dim:
      x = OutputFFN(self.output_ffn_dim, width, "embed", self.dtype, name="output_ffn")(x)
    x = nn.Dense(
        self.code_dim,
        dtype=jnp.float32,
        kernel_init=transformer.dense_init(("embed", "code_dim")),
        bias_init=transformer.zeros_init(("code_dim",)),
        name="to_code",
    )(x)
    return x


class Decoder(nn.Module):
  """Projection up from the code, position embedding, Transformer, output FFN to pixels."""

  stack: transformer.StackConfig
  patch_size: int
  grid: tuple[int, int]
  out_channels: int
  output_ffn_dim: int  # 0: one linear map per token to its pixels (`to_pixels`)
  dtype: Dtype
  position_embedding: str

  @nn.compact
  def __call__(self, codes: jax.Array, deterministic: bool = True) -> jax.Array:
    """codes: [B, N, code_dim] -> pixels [B, H, W, out_channels] float32."""
    width = self.stack.width
    x = nn.Dense(
        width,
        dtype=self.dtype,
        kernel_init=transformer.dense_init(("code_dim", "embed")),
        bias_init=transformer.zeros_init(("embed",)),
        name="from_code",
    )(codes)
    x = x + position_embedding(self, self.position_embedding, self.grid, width).astype(self.dtype)
    x = transformer.Transformer(self.stack, self.dtype, name="transformer")(x, deterministic)
    pixels_per_token = self.patch_size * self.patch_size * self.out_channels
    if self.output_ffn_dim:
      x = OutputFFN(self.output_ffn_dim, pixels_per_token, "patch", self.dtype, name="output_ffn")(
          x
      )
    else:
      x = nn.Dense(
          pixels_per_token,
          dtype=self.dtype,
          kernel_init=transformer.dense_init(("embed", "patch")),
          bias_init=transformer.zeros_init(("patch",)),
          name="to_pixels",
      )(x)
    return unpatchify(x.astype(jnp.float32), self.grid, self.patch_size)


class ViTVQGAN(nn.Module):
  """The stage-1 tokenizer. Build it with `ViTVQGAN.from_config(config)`."""

  encoder_stack: transformer.StackConfig
  decoder_stack: transformer.StackConfig
  image_size: int
  patch_size: int
  codebook_size: int
  code_dim: int
  l2_normalize: bool
  beta: float
  logit_laplace: bool
  logit_laplace_eps: float
  encoder_output_ffn_dim: int  # 0: the stack's mlp_dim
  decoder_output_ffn_dim: int
  dtype: Dtype
  position_embedding: str  # see the module docstring
  output_ffn: bool
  pixel_range: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ViTVQGAN":
    """Builds the model from the `model` section of a stage-1 config (and its image_size)."""
    m = config.model
    if config.image_size % m.patch_size:
      raise ValueError(
          f"image_size={config.image_size} is not a multiple of model.patch_size="
          f"{m.patch_size}; pick sizes with image_size % patch_size == 0."
      )
    return cls(
        encoder_stack=transformer.StackConfig.from_config(m.encoder),
        decoder_stack=transformer.StackConfig.from_config(m.decoder),
        image_size=config.image_size,
        patch_size=m.patch_size,
        codebook_size=m.codebook_size,
        code_dim=m.code_dim,
        l2_normalize=m.l2_normalize,
        beta=m.beta,
        logit_laplace=m.logit_laplace,
        logit_laplace_eps=m.logit_laplace_eps,
        encoder_output_ffn_dim=m.encoder.output_ffn_dim,
        decoder_output_ffn_dim=m.decoder.output_ffn_dim,
        dtype=jnp.dtype(m.dtype),
        position_embedding=m.position_embedding,
        output_ffn=m.output_ffn,
        pixel_range=m.pixel_range,
    )

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.patch_size
    return (side, side)

  def setup(self):
    for field, value, allowed in (
        ("position_embedding", self.position_embedding, POSITION_EMBEDDINGS),
        ("pixel_range", self.pixel_range, PIXEL_RANGES),
    ):
      if value not in allowed:
        raise ValueError(f"model.{field}={value!r}; expected one of {list(allowed)}.")
    ffn = lambda dim, stack: (dim or stack.mlp_dim) if self.output_ffn else 0
    self.encoder = Encoder(
        self.encoder_stack,
        self.patch_size,
        self.grid,
        self.code_dim,
        ffn(self.encoder_output_ffn_dim, self.encoder_stack),
        self.dtype,
        self.position_embedding,
    )
    self.quantizer = quantizer_lib.VectorQuantizer(
        self.codebook_size, self.code_dim, self.l2_normalize, self.beta
    )
    self.decoder = Decoder(
        self.decoder_stack,
        self.patch_size,
        self.grid,
        6 if self.logit_laplace else 3,
        ffn(self.decoder_output_ffn_dim, self.decoder_stack),
        self.dtype,
        self.position_embedding,
    )

  def _check_images(self, images: jax.Array):
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
          f"expected images of shape [B, {self.image_size}, {self.image_size}, 3], got "
          f"{images.shape}; resize inputs to the config's image_size."
      )

  def encode(self, images: jax.Array, deterministic: bool = True):
    """images [B, H, W, 3] -> (codes [B, N, d], indices [B, h, w], quantizer aux dict)."""
    self._check_images(images)
    if self.pixel_range == "zero_to_one":
      images = (images.astype(jnp.float32) + 1.0) * 0.5
    z = self.encoder(images, deterministic)
    codes, indices, aux = self.quantizer(z)
    return codes, indices.reshape(images.shape[0], *self.grid), aux

  def decode(self, codes: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
    """codes [B, N, d] -> {'reconstruction': [B, H, W, 3] in [-1, 1], and when logit-Laplace
    is on, 'mu' and 'log_scale': [B, H, W, 3] in logit space}."""
    raw = self.decoder(codes, deterministic)
    if not self.logit_laplace:
      return {"reconstruction": raw * 2.0 - 1.0 if self.pixel_range == "zero_to_one" else raw}
    mu, log_scale = raw[..., :3], raw[..., 3:]
    return {
        "reconstruction": logit_laplace_reconstruction(mu, self.logit_laplace_eps),
        "mu": mu,
        "log_scale": log_scale,
    }

  def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
    """Reconstructs images [B, H, W, 3]; returns decode()'s dict plus indices [B, h, w] and the
    quantizer's vq_loss, counts, codebook_usage and perplexity."""
    codes, indices, aux = self.encode(images, deterministic)
    return {**self.decode(codes, deterministic), "indices": indices, **aux}

  def encode_to_indices(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> int32 token indices [B, h, w]."""
    return self.encode(images)[1]

  def decode_from_indices(self, indices: jax.Array) -> jax.Array:
    """int indices [B, h, w] -> images [B, H, W, 3] in [-1, 1]."""
    codes = self.quantizer.embed(indices.reshape(indices.shape[0], -1))
    return self.decode(codes)["reconstruction"]


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def count_params_by_stack(params) -> dict[str, int]:
  """Parameter counts of the encoder, quantizer and decoder subtrees."""
  params = params.get("params", params)
  return {name: count_params(params[name]) for name in ("encoder", "quantizer", "decoder")}
