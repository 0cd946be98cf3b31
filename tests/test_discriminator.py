"""StyleGAN2 discriminator, GAN losses and regularisers against closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vim_jax.models import discriminator as disc_lib
from vim_jax.trainers import losses


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_output_shapes_and_depth_scale_with_image_size(size):
  d = disc_lib.StyleGANDiscriminator(size, channel_base=1024, max_channels=64)
  images = jax.ShapeDtypeStruct((4, size, size, 3), jnp.float32)
  variables = jax.eval_shape(d.init, jax.random.key(0), images)
  blocks = [k for k in variables["params"] if k.startswith("block_")]
  assert len(blocks) == int(np.log2(size)) - 2  # down to 4x4
  out = jax.eval_shape(d.apply, variables, images)
  assert out.shape == (4,) and out.dtype == jnp.float32


def _conv(x, kernel, bias, stride, pad):
  """Cross-correlation of x [B, H, W, C] with an HWIO kernel, zero padding, in float64."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  out = sum(
      xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride] @ kernel[i, j]
      for i in range(kh)
      for j in range(kw)
  )
  return out if bias is None else out + bias


def _discriminator_reference(p, x, group_size):
  """StyleGAN2's residual discriminator as the module docstring describes it, in float64
  numpy: lrelu(0.2) x sqrt(2); fromRGB; per block conv3x3, blur [1,3,3,1]^2 / 64 (pad 1 before,
  2 after), conv3x3 stride 2, plus a blurred 1x1 stride-2 skip without bias, summed / sqrt(2);
  the std over groups of `group_size` consecutive examples, averaged, as one more channel;
  conv3x3, dense, dense logit."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  lrelu = lambda v: np.where(v > 0, v, 0.2 * v) * np.sqrt(2.0)
  k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0

  def blur(v):
    vp = np.pad(v, ((0, 0), (1, 2), (1, 2), (0, 0)))
    return sum(
        k[i, j] * vp[:, i : i + v.shape[1], j : j + v.shape[2]] for i in range(4) for j in range(4)
    )

  h = lrelu(_conv(x, p["from_rgb"]["kernel"], p["from_rgb"]["bias"], 1, 0))
  for size in (32, 16, 8):
    b = p[f"block_{size}"]
    y = lrelu(_conv(h, b["conv0"]["kernel"], b["conv0"]["bias"], 1, 1))
    y = lrelu(_conv(blur(y), b["conv1"]["kernel"], b["conv1"]["bias"], 2, 1))
    h = (y + _conv(blur(h), b["skip"]["kernel"], None, 2, 0)) / np.sqrt(2.0)
  groups = h.reshape(-1, group_size, *h.shape[1:])
  std = np.sqrt(groups.var(axis=1) + 1e-8).mean(axis=(1, 2, 3))  # one value per group
  feature = np.repeat(std, group_size)[:, None, None, None] * np.ones(h.shape[:3] + (1,))
  h = np.concatenate([h, feature], axis=-1)
  h = lrelu(_conv(h, p["conv_4x4"]["kernel"], p["conv_4x4"]["bias"], 1, 1))
  h = lrelu(h.reshape(len(h), -1) @ p["fc"]["kernel"] + p["fc"]["bias"])
  return (h @ p["logit"]["kernel"] + p["logit"]["bias"])[:, 0]


def test_forward_matches_numpy_and_rejects_wrong_sizes():
  """The logits of a 32 px discriminator (3 residual blocks, two minibatch-stddev groups)
  against the float64 reference written out from the architecture's description."""
  d = disc_lib.StyleGANDiscriminator(32, channel_base=256, max_channels=32, mbstd_group_size=4)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  params = nn.meta.unbox(jax.jit(d.init)(jax.random.key(1), x))
  # Non-zero biases, so that each one's place is checked too.
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  logits = jax.jit(d.apply)(params, x)
  assert logits.shape == (8,)
  expected = _discriminator_reference(params["params"], np.asarray(x, np.float64), 4)
  np.testing.assert_allclose(
      np.asarray(logits), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )
  assert np.std(expected) > 1e-2  # the examples' logits differ: a real check of each
  with pytest.raises(ValueError, match="built for 32x32"):
    d.apply(params, jnp.zeros((4, 64, 64, 3)))


def test_blur_preserves_constants_and_mass():
  x = jnp.full((1, 8, 8, 2), 3.0)
  np.testing.assert_allclose(np.asarray(disc_lib.blur(x))[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
  delta = jnp.zeros((1, 9, 9, 1)).at[0, 4, 4, 0].set(1.0)
  np.testing.assert_allclose(float(disc_lib.blur(delta).sum()), 1.0, rtol=1e-6)


def test_minibatch_stddev_matches_numpy():
  x = np.random.default_rng(0).normal(size=(8, 2, 2, 3)).astype(np.float32)
  out = np.asarray(disc_lib.minibatch_stddev(jnp.asarray(x), group_size=4))
  # Groups are consecutive examples {0..3} and {4..7}, so a group stays on one device.
  expected = [np.sqrt(x[g * 4 : (g + 1) * 4].var(axis=0) + 1e-8).mean() for g in range(2)]
  np.testing.assert_allclose(out[..., :3], x)
  for i in range(8):
    np.testing.assert_allclose(out[i, ..., 3], expected[i // 4], rtol=1e-5)


def test_gan_losses_match_closed_forms():
  real, fake = np.array([2.0, -1.0]), np.array([0.5, -3.0])
  softplus = lambda z: np.log1p(np.exp(z))
  assert float(losses.discriminator_loss(real, fake, "non_saturating")) == pytest.approx(
      softplus(-real).mean() + softplus(fake).mean(), rel=1e-6
  )
  assert float(losses.generator_adversarial_loss(fake, "non_saturating")) == pytest.approx(
      softplus(-fake).mean(), rel=1e-6
  )
  assert float(losses.discriminator_loss(real, fake, "hinge")) == pytest.approx(
      np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()
  )
  assert float(losses.generator_adversarial_loss(fake, "hinge")) == pytest.approx(-fake.mean())
  with pytest.raises(ValueError, match="wasserstein"):
    losses.discriminator_loss(real, fake, "wasserstein")
  assert float(losses.lecam_regularizer(real, fake, 1.0, -1.0)) == pytest.approx(
      np.mean((real + 1) ** 2) + np.mean((fake - 1) ** 2)
  )


def test_r1_penalty_analytic_for_a_quadratic_discriminator():
  w = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
  d_fn = lambda x: jnp.sum(w * x**2, axis=(1, 2, 3)) / 2  # grad_x = w * x
  x = jax.random.normal(jax.random.key(1), (3, 4, 4, 3))
  expected = np.mean(np.sum(np.asarray(w * x) ** 2, axis=(1, 2, 3)))
  assert float(losses.r1_penalty(d_fn, x)) == pytest.approx(expected, rel=1e-5)


def test_r1_penalty_matches_finite_differences_on_the_discriminator():
  """Minibatch-stddev couples the examples, so this checks the gradient of the summed logits
  (what R1 differentiates), in float64."""
  with jax.enable_x64(True):
    d = disc_lib.StyleGANDiscriminator(8, channel_base=64, max_channels=8, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), dtype=jnp.float64)
    params = nn.meta.unbox(d.init(jax.random.key(1), x))
    d64 = lambda z: d.apply(params, z)
    x64 = x.astype(jnp.float64)
    eps = 1e-5
    # Central differences of sum_b D(x_b), one perturbed batch per input element, all of them
    # in one jitted, vmapped call.
    steps = eps * np.eye(x.size).reshape(x.size, *x.shape)
    summed = jax.jit(jax.vmap(lambda z: jnp.sum(d64(z))))
    up, down = summed(x64[None] + steps), summed(x64[None] - steps)
    grads = np.asarray((up - down) / (2 * eps)).reshape(x.shape)
    expected = np.mean(np.sum(grads**2, axis=(1, 2, 3)))
    assert float(losses.r1_penalty(d64, x64)) == pytest.approx(expected, rel=1e-6)


def test_initial_logits_are_not_saturated_at_256px():
  """Weights of variance 1/fan_in under the sqrt(2)-gain lrelu keep unit-variance activations,
  so the game starts unsaturated. He init on top of that gain gave mean initial logits of
  -3.5, -16.0, 69.2, -19.3, 129.8, -1.7 over these seeds (the issue measured -3.3 ... 130.3)."""
  d = disc_lib.StyleGANDiscriminator(256, max_channels=64)
  images = jax.random.normal(jax.random.key(100), (2, 256, 256, 3))
  init, apply = jax.jit(d.init), jax.jit(d.apply)
  means = []
  for seed in range(6):
    params = nn.meta.unbox(init(jax.random.key(seed), images))
    means.append(float(np.mean(np.asarray(apply(params, images)))))
  print(f"\nmean initial logit by seed: {np.round(means, 3).tolist()}")
  assert max(abs(m) for m in means) < 3.0, means
