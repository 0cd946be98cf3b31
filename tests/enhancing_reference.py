"""An independent PyTorch ViT-VQGAN in the layout of thuanz123/enhancing-transformers
(enhancing/modules/stage1/{layers,quantizers,vitvqgan}.py), written from their published
description for tests/test_import_enhancing.py; it shares nothing with vim_jax.

Images NCHW in [0, 1]. Encoder: Conv2d(3, D, p, stride p) -> tokens in raster order + a fixed
2-D sin-cos table -> pre-norm blocks (LayerNorm eps 1e-5; one bias-free to_qkv, heads outer,
softmax(q k^T / sqrt(d_head)) v, to_out with bias; Linear-Tanh-Linear MLP) -> LayerNorm.
pre_quant Linear(D, c). Quantizer: nearest code by Euclidean distance between l2-normalised
latents and l2-normalised codebook rows; the code is the normalised row. post_quant
Linear(c, D), + the table, blocks, LayerNorm, ConvTranspose2d(D, 3, p, stride p), no output
activation.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def sincos_table(grid: int, dim: int) -> torch.Tensor:
  """MAE's get_2d_sincos_pos_embed as they call it: [1, grid*grid, dim]; the first half
  encodes the column (np.meshgrid puts w first), each half [sin | cos]."""
  grid_h = np.arange(grid, dtype=np.float32)
  grid_w = np.arange(grid, dtype=np.float32)
  mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)

  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
  return torch.from_numpy(table).float()[None]


class Tokenizer:
  """Random-weight reference; `state` holds tensors under their state_dict keys."""

  def __init__(
      self,
      image=64,
      patch=8,
      dim=64,
      depth=2,
      heads=2,
      dim_head=32,
      mlp=128,
      codes=256,
      code_dim=32,
      seed=0,
  ):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    self.patch, self.dim, self.depth, self.heads, self.dim_head = patch, dim, depth, heads, dim_head
    self.grid = image // patch
    inner = heads * dim_head
    s = {}
    # Large enough that the patches, not the sin-cos table's near-constant low frequencies,
    # decide the codes (about 20 distinct codes for 4 noise images instead of 8).
    s["encoder.to_patch_embedding.0.weight"] = rand(dim, 3, patch, patch, scale=4 / patch / 3**0.5)
    s["encoder.to_patch_embedding.0.bias"] = rand(dim, scale=0.1)
    s["encoder.en_pos_embedding"] = sincos_table(self.grid, dim).double()
    for part in ("encoder", "decoder"):
      for i in range(depth):
        p = f"{part}.transformer.layers.{i}"
        for n in (0, 1):  # LayerNorms with non-trivial affine params, so a swap shows
          s[f"{p}.{n}.norm.weight"] = 1 + rand(dim, scale=0.1)
          s[f"{p}.{n}.norm.bias"] = rand(dim, scale=0.1)
        s[f"{p}.0.fn.to_qkv.weight"] = rand(3 * inner, dim, scale=dim**-0.5)
        s[f"{p}.0.fn.to_out.weight"] = rand(dim, inner, scale=inner**-0.5)
        s[f"{p}.0.fn.to_out.bias"] = rand(dim, scale=0.1)
        s[f"{p}.1.fn.net.0.weight"] = rand(mlp, dim, scale=dim**-0.5)
        s[f"{p}.1.fn.net.0.bias"] = rand(mlp, scale=0.1)
        s[f"{p}.1.fn.net.2.weight"] = rand(dim, mlp, scale=mlp**-0.5)
        s[f"{p}.1.fn.net.2.bias"] = rand(dim, scale=0.1)
      s[f"{part}.transformer.norm.weight"] = 1 + rand(dim, scale=0.1)
      s[f"{part}.transformer.norm.bias"] = rand(dim, scale=0.1)
    s["pre_quant.weight"] = rand(code_dim, dim, scale=dim**-0.5)
    s["pre_quant.bias"] = rand(code_dim, scale=0.1)
    s["quantizer.embedding.weight"] = rand(codes, code_dim)
    s["post_quant.weight"] = rand(dim, code_dim, scale=code_dim**-0.5)
    s["post_quant.bias"] = rand(dim, scale=0.1)
    s["decoder.de_pos_embedding"] = sincos_table(self.grid, dim).double()
    s["decoder.to_pixel.1.weight"] = rand(dim, 3, patch, patch, scale=dim**-0.5)
    s["decoder.to_pixel.1.bias"] = 0.5 + rand(3, scale=0.1)
    self.state = s

  def _transformer(self, x, part):
    s, h = self.state, self.heads
    for i in range(self.depth):
      p = f"{part}.transformer.layers.{i}"
      y = F.layer_norm(x, (self.dim,), s[f"{p}.0.norm.weight"], s[f"{p}.0.norm.bias"], 1e-5)
      q, k, v = F.linear(y, s[f"{p}.0.fn.to_qkv.weight"]).chunk(3, dim=-1)
      split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)
      q, k, v = split(q), split(k), split(v)
      attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim_head), dim=-1)
      out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
      x = x + F.linear(out, s[f"{p}.0.fn.to_out.weight"], s[f"{p}.0.fn.to_out.bias"])
      y = F.layer_norm(x, (self.dim,), s[f"{p}.1.norm.weight"], s[f"{p}.1.norm.bias"], 1e-5)
      y = torch.tanh(F.linear(y, s[f"{p}.1.fn.net.0.weight"], s[f"{p}.1.fn.net.0.bias"]))
      x = x + F.linear(y, s[f"{p}.1.fn.net.2.weight"], s[f"{p}.1.fn.net.2.bias"])
    return F.layer_norm(
        x,
        (self.dim,),
        s[f"{part}.transformer.norm.weight"],
        s[f"{part}.transformer.norm.bias"],
        1e-5,
    )

  def encode_codes(self, images01: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> int64 codes [B, h*w] (raster order)."""
    s = self.state
    x = F.conv2d(
        images01,
        s["encoder.to_patch_embedding.0.weight"],
        s["encoder.to_patch_embedding.0.bias"],
        stride=self.patch,
    )
    x = x.flatten(2).transpose(1, 2) + s["encoder.en_pos_embedding"]
    x = self._transformer(x, "encoder")
    z = F.normalize(F.linear(x, s["pre_quant.weight"], s["pre_quant.bias"]), dim=-1)
    codebook = F.normalize(s["quantizer.embedding.weight"], dim=-1)
    distance = (z**2).sum(-1, keepdim=True) + (codebook**2).sum(-1) - 2 * z @ codebook.T
    return distance.argmin(-1)

  def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
    """int codes [B, h*w] -> images [B, 3, H, W], nominally in [0, 1] (not clamped)."""
    s = self.state
    quant = F.normalize(s["quantizer.embedding.weight"][codes], dim=-1)
    x = (
        F.linear(quant, s["post_quant.weight"], s["post_quant.bias"])
        + s["decoder.de_pos_embedding"]
    )
    x = self._transformer(x, "decoder")
    x = x.transpose(1, 2).reshape(x.shape[0], self.dim, self.grid, self.grid)
    return F.conv_transpose2d(
        x, s["decoder.to_pixel.1.weight"], s["decoder.to_pixel.1.bias"], stride=self.patch
    )

  def lightning_checkpoint(self, step: int = 1234) -> dict:
    """Their released file's container: the model (with the loss networks' keys) under
    'state_dict', next to Lightning's own entries."""
    g = torch.Generator().manual_seed(99)
    loss = {
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3, generator=g),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1, generator=g),
        "loss.discriminator.final_linear.1.bias": torch.randn(1, generator=g),
    }
    state = {**loss, **{k: v.float() for k, v in self.state.items()}}
    return {
        "epoch": 3,
        "global_step": step,
        "pytorch-lightning_version": "1.6.5",
        "state_dict": state,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
