"""FLOPs of a step, counted from its jaxpr, as two numbers: model FLOPs (what MFU divides by)
and hardware FLOPs (what HFU divides by).

- **Model FLOPs**: the work the model itself needs, as PaLM (appendix B) and MaxText count it:
  every matrix product and convolution of the forward and backward pass (the transformer
  stacks, the output head, the discriminator's and LPIPS's convolutions), with causal
  attention's two L x L matmuls counted at half (the masked half is not model work; MaxText's
  `causal_attention_flops = noncausal_attention_flops / 2`). Recomputation is not model work.
- **Hardware FLOPs**: the same plus what rematerialisation recomputes in the backward pass
  (jax.checkpoint / nn.remat, and the loss head's chunked recompute). Causal attention is
  counted at half here too: the kernels the trainers run on TPU and GPU (splash, cuDNN) skip
  the masked tiles, so HFU - MFU is the recompute alone.

The count walks the jaxpr, not XLA's cost analysis, which counts a while loop's body once and
so misses all but one layer of a scanned stack (389 GFLOP instead of 15.1 TFLOP for the
VIM-Large step at batch 8). A scan body counts times its length; a cond at its costlier branch.
Recomputed equations carry jax's `rematted_computation` name scope, and causal attention ours
(`attention.CAUSAL_SCOPE`), so one trace gives both numbers. The step is traced with XLA
attention (`attention.xla_only`): a fused kernel's matmuls are invisible to a jaxpr.

Work that runs every k steps (stage 1's lazy R1) is its own compiled step; `mean_over_cycle`
averages the variants at their real frequency.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.extend import core as jax_core

from vim_jax.infra import tpu_slices
from vim_jax.models import attention

# jax names the recomputed forward of a jax.checkpoint (flax's nn.remat) this in the backward.
REMAT_SCOPE = "rematted_computation"


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one call: `model` (MFU's numerator) and `hardware` (model + recompute)."""

  model: float
  hardware: float

  def __add__(self, other: "StepFlops") -> "StepFlops":
    return StepFlops(self.model + other.model, self.hardware + other.hardware)

  def scaled(self, factor: float) -> "StepFlops":
    return StepFlops(self.model * factor, self.hardware * factor)

  @property
  def recompute_share(self) -> float:
    """Hardware FLOPs over model FLOPs, minus one: what remat costs."""
    return self.hardware / self.model - 1 if self.model else 0.0


ZERO = StepFlops(0.0, 0.0)


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


def count_jaxpr(jaxpr: jax_core.Jaxpr, recomputed: bool = False, causal: bool = False) -> StepFlops:
  """Matmul and convolution FLOPs of a jaxpr (see the module docstring). recomputed / causal:
  whether the enclosing equations are under the remat / causal-attention scope (a nested
  jaxpr's name stacks start afresh)."""
  total = ZERO
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    scopes = str(eqn.source_info.name_stack)
    eqn_recomputed = recomputed or REMAT_SCOPE in scopes
    eqn_causal = causal or attention.CAUSAL_SCOPE in scopes
    if name in ("dot_general", "conv_general_dilated"):
      flops = _dot_flops(eqn) if name == "dot_general" else _conv_flops(eqn)
      flops *= 0.5 if eqn_causal else 1.0
      total += StepFlops(0.0 if eqn_recomputed else flops, flops)
    elif name == "cond":
      branches = [count_jaxpr(b.jaxpr, eqn_recomputed, eqn_causal) for b in eqn.params["branches"]]
      total += max(branches, key=lambda f: f.hardware)
    else:
      inner = ZERO
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          inner += count_jaxpr(sub, eqn_recomputed, eqn_causal)
      total += inner.scaled(eqn.params["length"] if name == "scan" else 1)
  return total


def count_jaxpr_flops(jaxpr: jax_core.Jaxpr) -> float:
  """Hardware FLOPs of a jaxpr (with recompute)."""
  return count_jaxpr(jaxpr).hardware


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


def traced_flops(traced, fn, *args) -> StepFlops:
  """FLOPs of one call, from a jit's trace of fn(*args) (`jax.jit(fn).trace(*args)`): its own
  jaxpr, unless that calls fused kernels; then fn is traced again with XLA attention."""
  jaxpr = traced.jaxpr.jaxpr
  if holds_opaque_kernels(jaxpr):
    return count_step(fn, *args)
  return count_jaxpr(jaxpr)


def count_step(fn, *args) -> StepFlops:
  """FLOPs of one call of fn(*args) (arrays or ShapeDtypeStructs), over all devices. Trace it
  where it runs (inside the mesh and axis-rules context). Pass the Python function, not a
  jax.jit of it that has been traced before: jit reuses its cached trace, made without
  xla_only. (A while loop's body counts once; the train steps have none.)"""
  with attention.xla_only():
    # A new function object: make_jaxpr shares jit's trace cache, keyed on the function.
    closed = jax.make_jaxpr(lambda *a: fn(*a))(*args)
  return count_jaxpr(closed.jaxpr)


def step_flops(fn, *args) -> float:
  """Hardware FLOPs of one call of fn(*args) (see count_step)."""
  return count_step(fn, *args).hardware


def mean_over_cycle(regular: StepFlops, periodic: StepFlops, interval: int) -> StepFlops:
  """Mean FLOPs per step when `periodic` replaces `regular` every `interval` steps (lazy R1)."""
  return (regular.scaled(interval - 1) + periodic).scaled(1 / interval)


# --- Peak FLOP/s: what MFU and HFU divide by ---------------------------------------------------

# Dense bf16 peak per device, from the vendors' data sheets (NVIDIA's figures without
# sparsity; SXM parts). Matched against jax's device_kind, first match wins.
GPU_PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


# HBM bandwidth per device, bytes/s, from the same data sheets (H100 SXM 3.35 TB/s, H200
# 4.8 TB/s, A100 80GB 2.04 TB/s): the floor of a memory-bound step such as KV-cached decoding.
GPU_HBM_BYTES_PER_SECOND = (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.04e12))


def _published_figure(device: jax.Device, tpu_field: str, gpu_table) -> float | None:
  """A device's figure from its TPU generation (field tpu_field) or the GPU table, matched on
  jax's device_kind; None when unknown (CPU)."""
  kind = getattr(device, "device_kind", "") or ""
  if device.platform == "tpu":
    generation = tpu_slices.generation_of_device_kind(kind)
    return getattr(generation, tpu_field) if generation else None
  if device.platform == "gpu":
    return next((value for name, value in gpu_table if name in kind), None)
  return None


def hbm_bytes_per_second(device: jax.Device) -> float | None:
  """A device's published HBM bandwidth in bytes/s, or None when unknown (CPU)."""
  return _published_figure(device, "hbm_bytes_per_second", GPU_HBM_BYTES_PER_SECOND)


def peak_flops_per_second(device: jax.Device) -> float | None:
  """A device's dense bf16 peak FLOP/s, or None when unknown (CPU: MFU is then not logged).
  TPU figures per chip (tpu_slices.GENERATIONS); a megacore v4/v5p chip is one jax device."""
  return _published_figure(device, "peak_bf16_flops", GPU_PEAK_BF16_FLOPS)
