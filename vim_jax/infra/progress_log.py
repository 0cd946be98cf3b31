"""Throughput, FLOP rate, MFU / HFU and ETA of a long run, for its log lines."""

from __future__ import annotations

import math
import time


class Progress:
  """Throughput, FLOP rate, MFU / HFU and ETA between log points.

  Measures wall time between calls, so it includes input waiting: the numbers are what the
  run achieves, not an idealised kernel speed. flops_per_step_per_device: a flops.StepFlops
  (the mean over a cycle of step variants, e.g. lazy R1); peak_flops: the device's bf16 peak
  FLOP/s (flops.peak_flops_per_second), None when unknown (no MFU / HFU then).
  """

  def __init__(
      self,
      start_step: int,
      total_steps: int,
      global_batch_size: int,
      flops_per_step_per_device,
      num_devices: int,
      tokens_per_example: int = 0,
      peak_flops: float | None = None,
  ):
    self.total_steps, self.batch = total_steps, global_batch_size
    self.flops = flops_per_step_per_device
    self.peak = peak_flops
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
        "tflops_per_sec_per_device": steps_per_sec * self.flops.model / 1e12,
        "hardware_tflops_per_sec_per_device": steps_per_sec * self.flops.hardware / 1e12,
    }
    if self.peak:
      out["mfu"] = steps_per_sec * self.flops.model / self.peak
      out["hfu"] = steps_per_sec * self.flops.hardware / self.peak
    if self.tokens_per_example:
      out["tokens_per_sec_per_device"] = out["images_per_sec_per_device"] * self.tokens_per_example
    return out

  def eta_seconds(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return float("nan")
    rate = (time.perf_counter() - self.start_time) / done
    return rate * (self.total_steps - step)

  def describe(self, step: int, scalars: dict) -> str:
    """The throughput part of a log line: steps/s, images (or tokens) per second per device,
    model TFLOP/s per device, MFU and HFU when the peak is known, and the ETA."""
    if self.tokens_per_example:
      rate = f"{scalars['tokens_per_sec_per_device']:.0f} tokens/s/device"
    else:
      rate = f"{scalars['images_per_sec_per_device']:.1f} img/s/device"
    return (
        f"{scalars['steps_per_sec']:.2f} steps/s, {rate}, "
        f"{scalars['tflops_per_sec_per_device']:.3f} model TFLOP/s/device"
        f"{self.utilisation(scalars)}, ETA {format_duration(self.eta_seconds(step))}"
    )

  def utilisation(self, scalars: dict) -> str:
    """', MFU x%, HFU y%' for a log line ('' without a known peak)."""
    if "mfu" not in scalars:
      return ""
    return f", MFU {100 * scalars['mfu']:.1f}%, HFU {100 * scalars['hfu']:.1f}%"


def format_duration(seconds: float) -> str:
  """'1h02m03s' or '2m03s' ('?' for NaN / inf)."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
