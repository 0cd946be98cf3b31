"""Comparing two training runs: every array of their states and their logged scalars.

Adam divides the gradient's scale out of its update, and global-norm clipping hides it too, so
equal params after a few steps do not prove equal gradients. Adam's moments are linear (mu) and
quadratic (nu) in the (clipped) gradients, so they catch a wrong gradient leaf by leaf; the
logged grad_norm is taken before clipping, so it catches a wrong scale that clipping would
hide from the moments (a sharded path that sums where it should average)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest


def state_leaves(state) -> dict[str, np.ndarray]:
  """Every array of a train state (params, both optimizers' moments, the discriminator, the
  EMA, LeCam's averages) on the host, by path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _group(key: str) -> str:
  """'params', 'opt_state.mu', 'opt_state.nu', 'disc_params', ...: leaves compared on a
  common scale. Works for attribute paths (.params['a']) and dict paths (['params']['a'])."""
  names = re.findall(r"[A-Za-z_]\w*", key)
  top = names[0] if names else ""
  if "opt_state" in top:
    return top + next(("." + n for n in names[1:] if n in ("mu", "nu")), "")
  return top


def assert_leaves_close(la: dict, lb: dict, rel=1e-4, floor=1e-5, param_atol=0.0) -> float:
  """Each leaf of `lb` within rel x its largest magnitude in `la`, plus floor x the largest
  magnitude of its group (all params, all Adam first moments, ...), plus param_atol for
  parameters (not optimizer moments).

  - floor covers leaves whose true gradient is zero, which move by float noise alone: an
    attention key bias adds the same value to every score of a query, which the softmax
    ignores.
  - param_atol covers Adam's division of each gradient by its own magnitude: an element whose
    gradient is near zero moves by up to the learning rate per step whatever the rounding of
    its sum over devices. Pass the peak learning rate when comparing params across meshes.
    The moments are linear (mu) and quadratic (nu) in the gradients and need no such slack.
  rel=0 asks for bit-equality. Returns the largest share of its tolerance a leaf's difference
  uses (0..1; with rel=0, 0)."""
  assert la.keys() == lb.keys()
  group_max: dict[str, float] = {}
  for key, value in la.items():
    if value.size:
      group_max[_group(key)] = max(group_max.get(_group(key), 0.0), float(np.max(np.abs(value))))
  worst, failures = 0.0, []
  for key in la:
    if not la[key].size:
      continue
    scale = float(np.max(np.abs(la[key])))
    diff = float(np.max(np.abs(la[key].astype(np.float64) - lb[key])))
    tolerance = rel * scale
    if rel:
      tolerance += floor * group_max[_group(key)]
      tolerance += param_atol if "opt_state" not in _group(key) else 0.0
    if diff > tolerance:
      failures.append(
          f"{key}: max difference {diff:.3g} (scale {scale:.3g}, tolerance {tolerance:.3g})"
      )
    elif tolerance:
      worst = max(worst, diff / tolerance)
  assert not failures, "\n".join(failures)
  return worst


def assert_states_close(a, b, rel=1e-4, floor=1e-5, param_atol=0.0) -> float:
  """assert_leaves_close over every array of two train states."""
  return assert_leaves_close(state_leaves(a), state_leaves(b), rel, floor, param_atol)


def assert_same_metrics(a_metrics, b_metrics, keys=("loss", "grad_norm"), rel=1e-5):
  """The same steps logged, and each of `keys` (where logged) equal within rel."""
  assert [m["step"] for m in a_metrics] == [m["step"] for m in b_metrics]
  for a, b in zip(a_metrics, b_metrics):
    for key in keys:
      if key in a:
        assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (a["step"], key)
