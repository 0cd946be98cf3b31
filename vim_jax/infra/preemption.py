"""Preemption: SIGTERM is how TPU VMs (maintenance events) and schedulers (SLURM, Kubernetes)
ask a job to stop. Trainers then save a checkpoint at the next step boundary and return, and
evaluations stop after their current unit; the program exits 0 and rerunning the same command
resumes.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils

_stop_signal: int | None = None
_stopped = False

# Without JAX's preemption service, processes compare their stop flags every this many steps:
# the comparison is a blocking host all-gather, which must not run on every step of a pod job.
PREEMPTION_SYNC_EVERY = 10


def _on_stop_signal(signum, frame):
  del frame
  global _stop_signal
  _stop_signal = signum


def install_preemption_handler():
  """Turns SIGTERM into a stop request (commands call this after jax.distributed starts;
  libraries never take signals). In a multi-process job JAX's preemption service owns SIGTERM
  (its notifier tells every process, see preemption_requested), so Python's handler, which
  would replace it, is not installed."""
  if _preemption_service() is not None:
    return
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_stop_signal)


def _preemption_service():
  """JAX's preemption sync manager in a multi-process job (None in a single process, or when
  the jax_enable_preemption_service option turned it off)."""
  if jax.process_count() == 1:
    return None
  return distributed.global_state.preemption_sync_manager


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
  if jax.process_count() == 1:
    requested = _stop_signal is not None
  elif _preemption_service() is not None:
    requested = multihost_utils.reached_preemption_sync_point(step)
  elif step % PREEMPTION_SYNC_EVERY:
    requested = False
  else:
    flags = multihost_utils.process_allgather(np.asarray(_stop_signal is not None))
    requested = bool(np.any(flags))
  _stopped = _stopped or requested
  return requested


def stopped_for_preemption() -> bool:
  """For a program that runs several trainers in a row (the quickstart): whether one of them
  stopped for a SIGTERM, or (one process) a SIGTERM has arrived since."""
  return _stopped or (jax.process_count() == 1 and _stop_signal is not None)
