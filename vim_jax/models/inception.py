"""InceptionV3 as the standard FID and IS tools use it, in Flax.

This is the TF "inception-2015-12-05" graph as pytorch-fid ports it (`fid_inception_v3`):
torchvision's Inception3 layout with 1008 output classes, no auxiliary head, and pytorch-fid's
FIDInceptionA/C/E blocks, whose pooling differs from torchvision's:
  - A, C and E_1 average-pool their pool branch without counting the padding
    (count_include_pad=False);
  - E_2 (Mixed_7c) max-pools its pool branch (3x3, stride 1, pad 1) instead.
Every conv is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

Input: images [B, H, W, 3] in [0, 1]. They are resized to 299 x 299 (`resize`, see RESIZE_METHODS)
and scaled to [-1, 1] (2x - 1), as pytorch-fid does. Output: {'pool': [B, 2048] (the FID
features, after global average pooling), 'logits_unbiased': [B, 1008] (the IS logits: pool @ W,
without the fc bias, as improved-GAN's IS code, the ADM evaluator and torch-fidelity's
`logits_unbiased` take them from the graph's `softmax/logits/MatMul`), 'logits': [B, 1008] (the
graph's full classifier logits, pool @ W + b; not used for any score)}.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, converted once by
`python -m vim_jax.tools.convert_inception`. Parameter names follow the torch keys
(Mixed_5b/branch1x1/conv/kernel for Mixed_5b.branch1x1.conv.weight) so the converter is a rename.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import serialization

from vim_jax.infra import fileio

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BATCH_NORM_EPS = 1e-3

# How images reach 299 x 299. "bilinear" is pytorch-fid's F.interpolate(mode='bilinear',
# align_corners=False) without antialiasing; "bilinear_antialias" filters when downsampling
# (closer to PIL, as clean-fid argues). FIDs computed with different methods are not comparable.
RESIZE_METHODS = ("bilinear", "bilinear_antialias")


def resize_to_input(images: jax.Array, method: str = "bilinear") -> jax.Array:
  """[B, H, W, 3] -> [B, 299, 299, 3] with half-pixel centres (align_corners=False)."""
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize={method!r}; expected one of {RESIZE_METHODS}.")
  if images.shape[1:3] == (INPUT_SIZE, INPUT_SIZE):
    return images
  shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, images.shape[3])
  return jax.image.resize(images, shape, "linear", antialias=method == "bilinear_antialias")


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm whose running statistics are parameters (they are never trained
  here, and keeping them in 'params' makes the converted file one flat tree)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    mean = self.param("mean", nn.initializers.zeros_init(), (c,))
    var = self.param("var", nn.initializers.ones_init(), (c,))
    inv = scale * jax.lax.rsqrt(var + BATCH_NORM_EPS)
    return x * inv + (bias - mean * inv)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU; torch's BasicConv2d."""

  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)  # (rows, columns), symmetric, as torch's padding=(ph, pw)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(
        self.features,
        self.kernel,
        (self.stride, self.stride),
        padding=((ph, ph), (pw, pw)),
        use_bias=False,
        name="conv",
    )(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def avg_pool_3x3(x):
  """3x3, stride 1, pad 1, averaging over the real (unpadded) pixels only."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d (35 x 35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a, 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..e (17 x 17), factorized 7x7: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a, 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c (8 x 8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  pool='avg' (FIDInceptionE_1, without padding in the count) or 'max' (FIDInceptionE_2)."""

  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
        [
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ],
        -1,
    )
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
        [
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ],
        -1,
    )
    if self.pool == "avg":
      pooled = avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """pool [B, 2048] -> (pool @ W, pool @ W + b), each [B, 1008]: the graph's fc layer, with the
  product before its bias kept apart because the Inception Score is defined on it."""

  @nn.compact
  def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros_init(), (NUM_LOGITS,))
    unbiased = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
    return unbiased, unbiased + bias


class InceptionV3FID(nn.Module):
  """images [B, H, W, 3] in [0, 1] -> {'pool': [B, 2048], 'logits_unbiased': [B, 1008],
  'logits': [B, 1008]} (float32)."""

  resize: str = "bilinear"

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    x = resize_to_input(images.astype(jnp.float32), self.resize) * 2.0 - 1.0
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)  # 149
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool_3x3_stride2(x)  # 73
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = max_pool_3x3_stride2(x)  # 35
    x = InceptionA(32, name="Mixed_5b")(x)  # 256 channels
    x = InceptionA(64, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, name="Mixed_5d")(x)  # 288
    x = InceptionB(name="Mixed_6a")(x)  # 17 x 17 x 768
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8 x 8 x 1280
    x = InceptionE("avg", name="Mixed_7b")(x)  # 2048
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    unbiased, logits = Logits(name="fc")(pool)
    return {"pool": pool, "logits_unbiased": unbiased, "logits": logits}


MISSING_WEIGHTS_HELP = """\
FID Inception weights not found at {path!r}.
Make them once from pytorch-fid's published file (the TF inception-2015-12-05 graph):
  1. download
     https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  2. pip install '.[convert]'
     python -m vim_jax.tools.convert_inception \\
         --pth=/path/to/pt_inception-2015-12-05-6726825d.pth --output={path}
or point --inception_weights (config: fid.inception_weights) at an existing converted file."""


def check_weights(path: str):
  """Raises the missing-weights error now: trainers call it at start-up, before compiling, so a
  wrong path fails in seconds instead of at the first FID evaluation."""
  if not fileio.exists(path):
    raise FileNotFoundError(MISSING_WEIGHTS_HELP.format(path=path))


def load_params(path: str):
  """Converted Inception params (a .msgpack written by convert_inception), or a clear error."""
  check_weights(path)
  return serialization.msgpack_restore(fileio.read_bytes(path))
