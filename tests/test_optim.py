"""Optimizers: decoupled weight decay on matrices only, and global-norm clipping, against
closed forms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vim_jax import optim

LR, WD, B1 = 0.5, 0.1, 0.9


def _adamw(clip=1.0):
  config = ml_collections.ConfigDict(dict(b1=B1, b2=0.99, eps=1e-8, weight_decay=WD,
                                          grad_clip_norm=clip))
  return optim.adamw(config, lambda step: LR)


PARAMS = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
          "norm": {"scale": jnp.full((4,), 2.0)}, "embedding": jnp.full((5, 3), 2.0)}


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
