"""FLOPs of a step, counted from its jaxpr: what the trainers' TFLOP/s and MFU are made of.

XLA's cost analysis counts a while loop's body once, so it misses all but one layer of a
scanned stack (scan_layers=True): 389 GFLOP instead of 15.1 TFLOP for the VIM-Large step at
batch 8. Counting the jaxpr instead multiplies each scan body by its length. Counted: matrix
products (dot_general: 2 x batch x M x N x K) and convolutions (2 x output elements x the
kernel's inputs per output), which are all but a fraction of a percent of these models' work;
rematerialised recomputation is included (it is work the chip does). The step is traced with
XLA attention (`attention.xla_only`), whose two matmuls count what a fused kernel computes.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jax_core

from vim_jax.models import attention


def _dot_flops(eqn) -> float:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  batch = math.prod(lhs[d] for d in lhs_batch)
  contract = math.prod(lhs[d] for d in lhs_contract)
  m = math.prod(s for d, s in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
  n = math.prod(s for d, s in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch))
  return 2.0 * batch * m * n * contract


def _conv_flops(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2.0 * math.prod(out) * math.prod(rhs) / out_features


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def count_jaxpr_flops(jaxpr: jax_core.Jaxpr) -> float:
  """Matmul and convolution FLOPs of a jaxpr, scan bodies times their length, the costlier
  branch of a cond."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(count_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(count_jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


# Fused kernels whose matmuls the count cannot see: a Pallas call's body is one tile's work;
# cuDNN attention is an opaque custom call.
_OPAQUE_PRIMITIVES = ("pallas_call", "dot_product_attention")


def holds_opaque_kernels(jaxpr: jax_core.Jaxpr) -> bool:
  """Whether the jaxpr (or one inside it) calls a fused kernel the count cannot see into."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith(_OPAQUE_PRIMITIVES):
      return True
    if any(holds_opaque_kernels(j) for v in eqn.params.values() for j in _sub_jaxprs(v)):
      return True
  return False


def traced_flops(traced, fn, *args) -> float:
  """Total FLOPs of one call, from a jit's trace of fn(*args) (`jax.jit(fn).trace(*args)`):
  its own jaxpr, unless that calls fused kernels; then fn is traced again with XLA attention."""
  jaxpr = traced.jaxpr.jaxpr
  if holds_opaque_kernels(jaxpr):
    return step_flops(fn, *args)
  return count_jaxpr_flops(jaxpr)


def step_flops(fn, *args) -> float:
  """Total FLOPs of one call of fn(*args) (arrays or ShapeDtypeStructs), over all devices.
  Trace it where it runs (inside the mesh and axis-rules context). Pass the Python function,
  not a jax.jit of it that has been traced before: jit reuses its cached trace, made without
  xla_only. (A while loop's body counts once; the train steps have none.)"""
  with attention.xla_only():
    # A new function object: make_jaxpr shares jit's trace cache, keyed on the function.
    closed = jax.make_jaxpr(lambda *a: fn(*a))(*args)
  return count_jaxpr_flops(closed.jaxpr)
