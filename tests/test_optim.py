"""Optimizers: decoupled weight decay on matrices only, and global-norm clipping, against
closed forms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vim_jax.trainers import optim

LR, WD, B1 = 0.5, 0.1, 0.9


def _adamw(clip=1.0):
  config = ml_collections.ConfigDict(
      dict(b1=B1, b2=0.99, eps=1e-8, weight_decay=WD, grad_clip_norm=clip)
  )
  return optim.adamw(config, lambda step: LR)


PARAMS = {
    "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
    "norm": {"scale": jnp.full((4,), 2.0)},
    "embedding": jnp.full((5, 3), 2.0),
}


def test_weight_decay_reaches_matrices_only():
  """With zero gradients Adam's step is 0, so the update is the decay alone: -lr x wd x p on
  kernels and embeddings, nothing on biases and norm scales."""
  tx = _adamw()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["dense"]["kernel"], -LR * WD * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["embedding"], -LR * WD * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


@pytest.mark.parametrize("grad_value", [3.0, 0.01])
def test_gradients_are_clipped_to_the_global_norm(grad_value):
  """Adam's first moment after one step is (1 - b1) x the gradient scaled by
  min(1, clip / ||g||), with the norm over every leaf together."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), PARAMS)
  norm = grad_value * np.sqrt(sum(p.size for p in jax.tree.leaves(PARAMS)))
  for clip in (1.0, 0.0):  # 0 disables clipping
    tx = _adamw(clip)
    _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
    mu = optax.tree_utils.tree_get(state, "mu")
    scale = min(1.0, clip / norm) if clip else 1.0
    for leaf in jax.tree.leaves(mu):
      np.testing.assert_allclose(leaf, (1 - B1) * grad_value * scale, rtol=1e-5)


def _decay_names(params):
  """{'path/to/leaf': decayed?} of a parameter tree under optim's mask."""
  import flax

  mask = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(optim.decay_weights_only(params)), sep="/"
  )
  return {name: bool(decayed) for name, decayed in mask.items()}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_mask_on_the_real_models(scan_layers):
  """ViT-VQGAN, the VIM and the discriminator as the trainers build them: kernels and the
  token/class embedding tables are decayed; biases (the attention's are 2-D), LayerNorm scales
  (2-D when the layers are scanned), position embeddings and the codebook are not."""
  import flax.linen as nn

  from configs import vim_base, vitvq_base
  from vim_jax.models import discriminator, vim
  from vim_jax.models import tokenizer as tokenizer_lib

  stage1 = vitvq_base.get_config("tiny")
  stage2 = vim_base.get_config("tiny")
  for section in (stage1.model.encoder, stage1.model.decoder, stage2.model):
    section.scan_layers = scan_layers
  key = jax.random.key(0)
  image = jnp.zeros((1, stage1.image_size, stage1.image_size, 3))
  trees = {
      "vitvqgan": jax.eval_shape(tokenizer_lib.ViTVQGAN.from_config(stage1).init, key, image),
      "vim": jax.eval_shape(
          vim.VIM.from_config(stage2, 64, 16).init,
          key,
          jnp.zeros((1, 16), jnp.int32),
          jnp.zeros((1,), jnp.int32),
      ),
      "discriminator": jax.eval_shape(
          discriminator.StyleGANDiscriminator(32, 64, 32).init, key, image
      ),
  }
  trees = {model: nn.meta.unbox(variables) for model, variables in trees.items()}
  names = {}
  for model, variables in trees.items():
    names.update({f"{model}/{k}": v for k, v in _decay_names(variables["params"]).items()})
  decayed = sorted(n for n, d in names.items() if d)
  kept = sorted(n for n, d in names.items() if not d)
  last = lambda name: name.rsplit("/", 1)[-1]
  for name in decayed:
    assert last(name) in ("kernel", "embedding") or last(name).endswith("_kernel"), name
  for name in kept:
    assert last(name) in ("bias", "scale", "position_embedding", "codebook") or last(name).endswith(
        "_bias"
    ), name
  assert "vim/token_embedding/embedding" in decayed
  assert "vim/condition_embedding/embedding" in decayed
  assert "vitvqgan/quantizer/codebook" in kept
  assert any(n.endswith("query_bias") for n in kept) and any(
      n.endswith("query_kernel") for n in decayed
  )
  assert any(n.startswith("discriminator/") for n in decayed)
  # The former rule (ndim >= 2) decayed these: 2-D attention biases, position embeddings and
  # the codebook, and with scanned layers every LayerNorm scale and bias.
  wrongly = [n for n in kept if _leaf(trees, n).ndim >= 2]
  assert (
      any("position_embedding" in n for n in wrongly) and "vitvqgan/quantizer/codebook" in wrongly
  )
  print(f"kept out of decay that ndim >= 2 decayed ({len(wrongly)}): {wrongly}")


def _leaf(trees, name):
  model, *path = name.split("/")
  node = trees[model]["params"]
  for key in path:
    node = node[key]
  return node


def _warmup_cosine(step, peak, end, warmup, total):
  """Linear from 0 to peak over `warmup` steps, then half a cosine from peak to end over the
  remaining total - warmup steps, then end (written out here, not through optax)."""
  if step < warmup:
    return peak * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * t))


def test_stage1_schedule_is_linear_warmup_then_cosine_to_end_lr():
  """The stage-1 schedule against its closed form: at the paper's config (peak 1e-4 after 50k
  linear warmup steps, cosine to 5e-5 at step 500k: 7.5e-5 halfway through the decay), at a
  small one, and where warmup_steps >= total_steps (warmup then ends one step before the end)."""
  from configs import vitvq_base

  paper = vitvq_base.get_config().optimizer
  schedule = optim.warmup_cosine_schedule(paper, 500_000)
  for step, expected in (
      (0, 0.0),
      (25_000, 5e-5),
      (50_000, 1e-4),
      (275_000, 7.5e-5),
      (500_000, 5e-5),
      (600_000, 5e-5),
  ):
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
  small = ml_collections.ConfigDict(dict(peak_lr=2.0, end_lr=0.5, warmup_steps=4))
  schedule = optim.warmup_cosine_schedule(small, 20)
  for step in range(0, 25):
    assert float(schedule(step)) == pytest.approx(
        _warmup_cosine(step, 2.0, 0.5, 4, 20), rel=1e-6, abs=1e-7
    ), step
  clamped = optim.warmup_cosine_schedule(small, 3)  # warmup 4 > 3 steps: warmup 2
  assert [float(clamped(s)) for s in range(5)] == pytest.approx(
      [_warmup_cosine(s, 2.0, 0.5, 2, 3) for s in range(5)], rel=1e-6, abs=1e-7
  )


@pytest.mark.parametrize("arg", ["", "tiny"], ids=["paper", "tiny"])
def test_vim_step_schedule_against_its_closed_form(arg):
  """VIM's learning rate at every phase boundary and between, against the closed form written
  out here in float64: lr(t) = peak t / w for t < w (linear warmup from 0), peak until the decay
  starts at d, peak (end / peak)^((t - d) / (T - d)) from d to T, end after. The paper's config
  (w 5k, d 80k, T 450k) and the tiny one (no warmup: peak from step 0). A warmup one step
  longer, a curved warmup, or a decay starting a step late fails here."""
  from configs import vim_base

  config = vim_base.get_config(arg or None)
  opt, total = config.optimizer, config.total_steps
  peak, end, w, d = opt.peak_lr, opt.end_lr, opt.warmup_steps, opt.decay_start

  def expected(t):
    if t < w:
      return peak * t / w
    if t <= d:
      return peak
    return peak * (end / peak) ** ((min(t, total) - d) / (total - d))

  schedule = optim.warmup_exponential_schedule(opt, total)
  steps = sorted(
      {
          0,
          1,
          w // 4,
          w // 2,
          3 * w // 4,
          max(w - 1, 0),
          w,
          w + 1,
          (w + d) // 2,
          d,
          d + 1,
          d + (total - d) // 3,
          (d + total) // 2,
          total - 1,
          total,
          total + 100,
      }
  )
  # optax computes the warmup as peak - peak (1 - t / w) in float32: an absolute error of a
  # few float32 ulps of peak (2^-24 peak each), large relative to lr(t) only for t << w.
  for t in steps:
    assert float(schedule(t)) == pytest.approx(expected(t), rel=2e-6, abs=peak * 2**-21), t
