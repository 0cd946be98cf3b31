"""Stage-1 loss terms: pure functions of arrays.

Images are in [-1, 1]. Each term is a scalar; `weighted_total` combines a dict of terms with the
weights from the config's `loss` section, so later terms (perceptual, adversarial) slot in by
adding an entry to the dict and a weight to the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp


def l2_loss(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all elements; both [B, H, W, C] in [-1, 1]."""
  return jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - target.astype(jnp.float32)))


def l1_loss(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(reconstruction.astype(jnp.float32) - target.astype(jnp.float32)))


def squash_to_unit_interval(images: jax.Array, eps: float) -> jax.Array:
  """[-1, 1] -> [eps, 1 - eps], so that logit() stays finite (DALL-E uses eps = 0.1)."""
  x01 = (images.astype(jnp.float32) + 1.0) / 2.0
  return eps + (1.0 - 2.0 * eps) * x01


def logit_laplace_nll(
    mu: jax.Array, log_scale: jax.Array, target: jax.Array, eps: float
) -> jax.Array:
  """Mean negative log-likelihood of the logit-Laplace distribution, per pixel channel.

  The density on x in (0, 1) is  p(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)),
  so  -log p(x) = |logit(x) - mu| / b + log b + log 2 + log x + log(1 - x).
  The last three terms do not depend on the model; they are kept so the value is a true NLL.

  Args:
    mu, log_scale: [B, H, W, 3] decoder outputs in logit space.
    target: [B, H, W, 3] images in [-1, 1], squashed to [eps, 1 - eps] before the logit.
    eps: squashing margin.
  """
  x = squash_to_unit_interval(target, eps)
  y = jnp.log(x) - jnp.log1p(-x)
  mu = mu.astype(jnp.float32)
  log_scale = log_scale.astype(jnp.float32)
  nll = (
      jnp.abs(y - mu) * jnp.exp(-log_scale) + log_scale + math.log(2.0) + jnp.log(x) + jnp.log1p(-x)
  )
  return jnp.mean(nll)


def reconstruction_terms(
    outputs: Mapping[str, jax.Array], images: jax.Array, logit_laplace_eps: float
) -> dict[str, jax.Array]:
  """The stage-1 terms available from a ViTVQGAN forward pass.

  Args:
    outputs: ViTVQGAN.__call__'s dict (reconstruction, vq_loss, and mu/log_scale when the
      decoder predicts logit-Laplace parameters).
    images: [B, H, W, 3] targets in [-1, 1].
  """
  terms = {"l2": l2_loss(outputs["reconstruction"], images), "vq": outputs["vq_loss"]}
  if "mu" in outputs:
    terms["logit_laplace"] = logit_laplace_nll(
        outputs["mu"], outputs["log_scale"], images, logit_laplace_eps
    )
  return terms


def weighted_total(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """sum_k weights[k] * terms[k]; a term without a weight is an error, not silently dropped."""
  missing = sorted(set(terms) - set(weights))
  if missing:
    raise KeyError(
        f"loss terms {missing} have no weight in config.loss (has {sorted(weights)}); "
        "add e.g. --config.loss.<name>=1.0"
    )
  return sum(weights[name] * value for name, value in terms.items())


# ----------------------------------------------------------------------------------------------
# Adversarial terms. Logits are [B] float32.
# ----------------------------------------------------------------------------------------------
GAN_LOSSES = ("non_saturating", "hinge")


def _check_gan_loss(kind: str):
  if kind not in GAN_LOSSES:
    raise ValueError(f"discriminator.loss={kind!r}; expected one of {GAN_LOSSES}.")


def adaptive_adversarial_weight(
    reconstruction_grad, adversarial_grad, max_weight: float = 1e4
) -> jax.Array:
  """||reconstruction_grad|| / (||adversarial_grad|| + 1e-4), clipped to [0, max_weight] and
  without gradient (taming VQGAN's balance). Arguments are pytrees of gradients with respect
  to the same tensors (here the tokenizer's image outputs)."""
  norm = lambda tree: jnp.sqrt(
      sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
  )
  weight = norm(reconstruction_grad) / (norm(adversarial_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  """The discriminator's loss.

  Non-saturating: softplus(-D(x)) + softplus(D(G(z))); hinge: relu(1 - D(x)) + relu(1 + D(G(z))).
  """
  _check_gan_loss(kind)
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def generator_adversarial_loss(fake_logits: jax.Array, kind: str) -> jax.Array:
  """Non-saturating: softplus(-D(G(z))); hinge: -D(G(z))."""
  _check_gan_loss(kind)
  if kind == "hinge":
    return -jnp.mean(fake_logits)
  return jnp.mean(jax.nn.softplus(-fake_logits))


def r1_penalty(discriminator_fn, real_images: jax.Array) -> jax.Array:
  """R1 (Mescheder et al. 2018): E_x ||grad_x D(x)||^2 over real images [B, H, W, C].

  The mean over the batch of the squared gradient norm of each example's logit (examples are
  independent, so the gradient of the summed logits gives every per-example gradient).
  Callers scale it by gamma / 2.
  """
  grads = jax.grad(lambda x: jnp.sum(discriminator_fn(x)))(real_images)
  return jnp.mean(jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=(1, 2, 3)))


def lecam_regularizer(
    real_logits: jax.Array, fake_logits: jax.Array, ema_real: jax.Array, ema_fake: jax.Array
) -> jax.Array:
  """LeCam (Tseng et al. 2021): E||D(x) - ema_fake||^2 + E||D(G(z)) - ema_real||^2."""
  return jnp.mean(jnp.square(real_logits - ema_fake)) + jnp.mean(jnp.square(fake_logits - ema_real))
