"""Pieces every trainer shares: compiling a step with its cost and memory report, progress
logging with throughput and ETA, and the NaN guard."""

from __future__ import annotations

import logging
import math
import time

from typing import Any

import flax
import jax
import numpy as np

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """A model's params and optimizer state at a step (stage 2, the classifier). Stage 1 keeps
  its own, with the GAN fields."""

  step: jax.Array
  params: Any
  opt_state: Any


def compile_step(jitted, *args):
  """Traces, lowers and compiles `jitted` for `args` (arrays or ShapeDtypeStructs).

  Returns (compiled, flops.StepFlops per device per call: model and hardware FLOPs, counted
  over the devices the program runs on). The count reads the same trace the program is
  compiled from, unless that trace calls a fused attention kernel whose matmuls it cannot see:
  then the Python function is traced once more with XLA attention (not the jitted one, whose
  cached trace holds the kernel).
  """
  from vim_jax.infra import flops
  traced = jitted.trace(*args)
  compiled = traced.lower().compile()
  shardings = [s for s in jax.tree.leaves(compiled.input_shardings)
               if isinstance(s, jax.sharding.Sharding)]
  num_devices = max((s.num_devices for s in shardings), default=1)
  step_fn = getattr(jitted, "__wrapped__", jitted)
  return compiled, flops.traced_flops(traced, step_fn, *args).scaled(1 / num_devices)


def describe_flops(flops_per_device, name: str, peak: float | None) -> str:
  """One line with a step's model and hardware FLOPs per device (vim_jax/infra/flops.py)."""
  f = flops_per_device
  line = (f"{name}: {f.model / 1e9:.3f} model GFLOP per device per step, "
          f"{f.hardware / 1e9:.3f} hardware GFLOP (+{100 * f.recompute_share:.1f}% recompute; "
          "matmuls and convolutions counted from the jaxpr, vim_jax/infra/flops.py)")
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
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - \
      m.alias_size_in_bytes
  return (f"{name} per-device memory: arguments {mib(m.argument_size_in_bytes):.1f} MiB, "
          f"outputs {mib(m.output_size_in_bytes):.1f} MiB, temporaries "
          f"{mib(m.temp_size_in_bytes):.1f} MiB, aliased {mib(m.alias_size_in_bytes):.1f} MiB, "
          f"total {mib(total):.1f} MiB")


def log_parameter_overview(params) -> None:
  """clu's table of parameter shapes, with each one's mean and std when this process can read
  every value (a tensor-parallel group across hosts holds parts of some arrays elsewhere)."""
  from clu import parameter_overview
  readable = all(x.is_fully_addressable for x in jax.tree.leaves(params)
                 if isinstance(x, jax.Array))
  parameter_overview.log_parameter_overview(params, include_stats=readable)


def mean_metrics(history: list[dict]) -> dict[str, float]:
  """Host means of a list of per-step metric dicts of (device) scalars."""
  history = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


class Progress:
  """Throughput, FLOP rate, MFU / HFU and ETA between log points.

  Measures wall time between calls, so it includes input waiting: the numbers are what the
  run achieves, not an idealised kernel speed. flops_per_step_per_device: a flops.StepFlops
  (the mean over a cycle of step variants, e.g. lazy R1); peak_flops: the device's bf16 peak
  FLOP/s (flops.peak_flops_per_second), None when unknown (no MFU / HFU then).
  """

  def __init__(self, start_step: int, total_steps: int, global_batch_size: int,
               flops_per_step_per_device, num_devices: int, tokens_per_example: int = 0,
               peak_flops: float | None = None):
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

  def utilisation(self, scalars: dict) -> str:
    """', MFU x%, HFU y%' for a log line ('' without a known peak)."""
    if "mfu" not in scalars:
      return ""
    return f", MFU {100 * scalars['mfu']:.1f}%, HFU {100 * scalars['hfu']:.1f}%"


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


def open_workdir(workdir: str, config):
  """Checks the config's values, creates the workdir, writes config.json (process 0) and
  returns the metric writer.

  Only process 0 writes TensorBoard summaries; the others just log.
  """
  from vim_jax.infra import config_checks, fileio, runs, summaries
  config_checks.check(config)  # before anything is written or compiled
  fileio.makedirs(workdir)
  runs.write_config(workdir, config)
  return summaries.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def check_divisible(mesh, **batch_sizes):
  """Every batch size must split evenly over the data-parallel devices."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, size in batch_sizes.items():
    if size % dp:
      raise ValueError(f"config.{name}={size} is not divisible by the data-parallel size {dp} "
                       f"(mesh {dict(mesh.shape)}); use a multiple of {dp}.")


def create_or_restore_state(init_fn, seed: int, mesh, rules, ckpt):
  """The sharded train state: restored from ckpt's latest step, else freshly initialised.

  init_fn(rng) returns a state whose params carry logical-axis boxes. Returns
  (state, state_shardings, abstract_state, latest_step_or_None).
  """
  import flax.linen as nn

  from vim_jax.infra import checkpoint, parallel
  with parallel.tracing_context(mesh, rules):
    boxed_shapes = jax.eval_shape(init_fn, jax.random.key(seed))
  shardings = parallel.logical_shardings(boxed_shapes, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed_shapes), shardings)
  state, latest = ckpt.restore_latest(abstract)
  if state is None:
    with parallel.tracing_context(mesh, rules):
      state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(
          jax.random.key(seed))
  log.info("%s at step %d", "starting" if latest is None else "resumed", int(state.step))
  return state, shardings, abstract, latest


class TrainWindows:
  """Train-metric logging windows, each closed one step late.

  The steps' metrics stay on the device until their window closes. A window that ends at step
  N is fetched, NaN-checked and written once step N+1 has been dispatched (close_pending,
  called right after dispatching), so fetching never waits for the newest step and the
  device's queue never runs dry for a log line. The run's last window (the end, or a stop) is
  closed at once. `describe(step, scalars)` writes the trainer's log line.

  close_pending() returns whether it wrote a window: the trainer then flushes its writer, so
  that each window reaches TensorBoard at its log step (vim_jax.infra.summaries writes event files on
  flush only; the run's last window lands with the trainer's final flush).
  """

  def __init__(self, writer, progress: Progress, describe):
    self.writer, self.progress, self.describe = writer, progress, describe
    self.history: list[dict] = []
    self.logged: list[dict[str, float]] = []  # each closed window's scalars, with 'step'
    self._pending = None  # (step, history, last_checkpoint, skipped_images)

  def add(self, metrics: dict):
    self.history.append(metrics)

  def end(self, step: int, last_checkpoint: int | None, skipped_images: int, at_once: bool):
    """Ends the window at `step`: closed now if at_once, else at the next close_pending."""
    self.close_pending()
    self._pending = (step, self.history, last_checkpoint, skipped_images)
    self.history = []
    if at_once:
      self.close_pending()

  def close_pending(self) -> bool:
    if self._pending is None:
      return False
    step, history, last_checkpoint, skipped_images = self._pending
    self._pending = None
    scalars = mean_metrics(history)
    check_finite(scalars["loss"], step, last_checkpoint)
    scalars.update(self.progress.update(step))
    scalars["data/skipped_images"] = skipped_images
    self.writer.write_scalars(step, {k if "/" in k else f"train/{k}": v
                                     for k, v in scalars.items()})
    self.logged.append({"step": step, **scalars})
    self.describe(step, scalars)
    return True


def save_if_finite(ckpt, step: int, state, last_loss, last_checkpoint: int | None) -> int:
  """Saves `state` unless the last step's loss is NaN/inf (which stops the run instead)."""
  check_finite(float(jax.device_get(last_loss)), step, last_checkpoint)
  ckpt.save(step, state, force=True)
  return step


# ----------------------------------------------------------------------------------------------
# Preemption: SIGTERM is how TPU VMs (maintenance events) and schedulers (SLURM, Kubernetes)
# ask a job to stop. The trainers then save a checkpoint at the next step boundary and return,
# and the program exits 0; rerunning the same command resumes.
# ----------------------------------------------------------------------------------------------
_stop_signal: int | None = None


def _on_stop_signal(signum, frame):
  del frame
  global _stop_signal
  _stop_signal = signum


def install_preemption_handler():
  """Turns SIGTERM into a stop request (main.py calls this, after jax.distributed starts;
  libraries never take signals). In a multi-process job JAX's preemption service owns SIGTERM
  (its notifier tells every process, see preemption_requested), so Python's handler, which
  would replace it, is not installed."""
  import signal
  import threading
  if _preemption_service() is not None:
    return
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_stop_signal)


def _preemption_service():
  """JAX's preemption sync manager in a multi-process job (None in a single process, or when
  the jax_enable_preemption_service option turned it off)."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed
  return distributed.global_state.preemption_sync_manager


# Without the preemption service, processes compare their stop flags every this many steps:
# the comparison is a blocking host all-gather, which must not run on every step of a pod job.
PREEMPTION_SYNC_EVERY = 10


def preemption_requested(step: int) -> bool:
  """Whether to save at `step` and stop because a process got SIGTERM.

  One process: at the first step after the signal. Several: at the step JAX's preemption
  service agrees on (the largest step any process had reached when the notice spread, plus
  one), so every process saves the same checkpoint and stops together. Asking costs nothing on
  the other steps: no host collective, so the device queue never drains. Call it at every
  step, with increasing steps. (With the service off, a blocking all-gather of the flags at
  steps divisible by PREEMPTION_SYNC_EVERY does the same.)
  """
  global _stopped
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    requested = _stop_signal is not None
  elif _preemption_service() is not None:
    requested = multihost_utils.reached_preemption_sync_point(step)
  elif step % PREEMPTION_SYNC_EVERY:
    requested = False
  else:
    import numpy as np
    flags = multihost_utils.process_allgather(np.asarray(_stop_signal is not None))
    requested = bool(np.any(flags))
  _stopped = _stopped or requested
  return requested


_stopped = False


def stopped_for_preemption() -> bool:
  """For a program that runs several trainers in a row (the quickstart): whether one of them
  stopped for a SIGTERM, or (one process) a SIGTERM has arrived since."""
  return _stopped or (jax.process_count() == 1 and _stop_signal is not None)
