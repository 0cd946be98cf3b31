"""Compiling a train or eval step ahead of time, with its FLOPs and memory for the log."""

from __future__ import annotations

import jax

from vim_jax.infra import flops


def compile_step(jitted, *args):
  """Traces, lowers and compiles `jitted` for `args` (arrays or ShapeDtypeStructs).

  Returns (compiled, flops.StepFlops per device per call: model and hardware FLOPs, counted
  over the devices the program runs on). The count reads the same trace the program is
  compiled from, unless that trace calls a fused attention kernel whose matmuls it cannot see:
  then the Python function is traced once more with XLA attention (not the jitted one, whose
  cached trace holds the kernel).
  """
  traced = jitted.trace(*args)
  compiled = traced.lower().compile()
  shardings = [
      s for s in jax.tree.leaves(compiled.input_shardings) if isinstance(s, jax.sharding.Sharding)
  ]
  num_devices = max((s.num_devices for s in shardings), default=1)
  step_fn = getattr(jitted, "__wrapped__", jitted)
  return compiled, flops.traced_flops(traced, step_fn, *args).scaled(1 / num_devices)


def describe_flops(flops_per_device, name: str, peak: float | None) -> str:
  """One line with a step's model and hardware FLOPs per device (vim_jax/infra/flops.py)."""
  f = flops_per_device
  line = (
      f"{name}: {f.model / 1e9:.3f} model GFLOP per device per step, "
      f"{f.hardware / 1e9:.3f} hardware GFLOP (+{100 * f.recompute_share:.1f}% recompute; "
      "matmuls and convolutions counted from the jaxpr, vim_jax/infra/flops.py)"
  )
  if peak:
    line += f"; MFU and HFU against {peak / 1e12:.0f} bf16 TFLOP/s per device"
  else:
    line += "; no known peak FLOP/s for this device, so no MFU / HFU"
  return line


def describe_memory(compiled, name: str) -> str:
  """One line with the compiled program's per-device memory use."""
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except; not every backend reports it
    return f"{name}: memory analysis unavailable ({e})"
  if m is None:
    return f"{name}: memory analysis unavailable"
  mib = lambda b: b / 2**20
  total = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )
  return (
      f"{name} per-device memory: arguments {mib(m.argument_size_in_bytes):.1f} MiB, "
      f"outputs {mib(m.output_size_in_bytes):.1f} MiB, temporaries "
      f"{mib(m.temp_size_in_bytes):.1f} MiB, aliased {mib(m.alias_size_in_bytes):.1f} MiB, "
      f"total {mib(total):.1f} MiB"
  )
