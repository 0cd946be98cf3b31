"""Pieces every trainer shares: compiling a step with its cost and memory report, progress
logging with throughput and ETA, and the NaN guard."""

from __future__ import annotations

import logging
import math
import time

import jax
import numpy as np

log = logging.getLogger(__name__)


def compile_step(jitted, *args):
  """Lowers and compiles `jitted` for `args` (arrays or ShapeDtypeStructs).

  Returns (compiled, flops per device per call from XLA's cost analysis, or nan).
  """
  compiled = jitted.lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))
  return compiled, flops


def describe_memory(compiled, name: str) -> str:
  """One line with the compiled program's per-device memory use."""
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except; not every backend reports it
    return f"{name}: memory analysis unavailable ({e})"
  if m is None:
    return f"{name}: memory analysis unavailable"
  mib = lambda b: b / 2**20
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - \
      m.alias_size_in_bytes
  return (f"{name} per-device memory: arguments {mib(m.argument_size_in_bytes):.1f} MiB, "
          f"outputs {mib(m.output_size_in_bytes):.1f} MiB, temporaries "
          f"{mib(m.temp_size_in_bytes):.1f} MiB, aliased {mib(m.alias_size_in_bytes):.1f} MiB, "
          f"total {mib(total):.1f} MiB")


def mean_metrics(history: list[dict]) -> dict[str, float]:
  """Host means of a list of per-step metric dicts of (device) scalars."""
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


class Progress:
  """Throughput and ETA between log points.

  Measures wall time between calls, so it includes input waiting: the numbers are what the
  run achieves, not an idealised kernel speed.
  """

  def __init__(self, start_step: int, total_steps: int, global_batch_size: int,
               flops_per_step_per_device: float, num_devices: int,
               tokens_per_example: int = 0):
    self.total_steps, self.batch = total_steps, global_batch_size
    self.flops = flops_per_step_per_device
    self.tokens_per_example = tokens_per_example
    self.devices = num_devices
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.start_step, self.start_time = start_step, self.last_time

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps, seconds = step - self.last_step, max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    steps_per_sec = steps / seconds
    out = {
        "steps_per_sec": steps_per_sec,
        "images_per_sec_per_device": steps_per_sec * self.batch / self.devices,
        "tflops_per_sec_per_device": steps_per_sec * self.flops / 1e12,
    }
    if self.tokens_per_example:
      out["tokens_per_sec_per_device"] = out["images_per_sec_per_device"] * self.tokens_per_example
    return out

  def eta_seconds(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return float("nan")
    rate = (time.perf_counter() - self.start_time) / done
    return rate * (self.total_steps - step)


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def check_finite(loss: float, step: int, last_checkpoint: int | None):
  """Stops a run whose loss is NaN/inf, naming the step and the checkpoint to go back to."""
  if not math.isfinite(loss):
    where = (f"the last good checkpoint is step {last_checkpoint}" if last_checkpoint is not None
             else "no checkpoint was written")
    raise FloatingPointError(
        f"loss is {loss} at step {step}; stopping without saving ({where}). Lower "
        "optimizer.peak_lr or set optimizer.grad_clip_norm, then rerun to resume.")
