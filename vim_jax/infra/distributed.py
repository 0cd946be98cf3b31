"""Multi-process start-up shared by every command (main, evaluate, sample, probe,
tools.pretokenize): the same flags and the same auto-detection, so that on a multi-host slice
every worker runs the same command line (launch/README.md).

  distributed.define_flags()   # once, where the command defines its flags
  ...
  distributed.start()          # in main(), before anything touches a device
"""

from __future__ import annotations

import os

from absl import flags, logging


def define_flags():
  """--distributed, --coordinator_address, --num_processes, --process_id, --heartbeat_timeout."""
  flags.DEFINE_enum(
      "distributed",
      "auto",
      ["auto", "on", "off"],
      "Multi-host start-up (jax.distributed.initialize). on: always (TPU pod slices, where JAX "
      "finds the coordinator itself; SLURM; Open MPI); auto: when --coordinator_address is "
      "given or SLURM / Open MPI report several tasks; off: single process.",
  )
  flags.DEFINE_string(
      "coordinator_address",
      None,
      "host:port of process 0, for clusters JAX cannot detect "
      "(with --num_processes and --process_id).",
  )
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
  flags.DEFINE_integer(
      "heartbeat_timeout",
      100,
      "Multi-process jobs: seconds without a heartbeat after which "
      "JAX declares a process dead and stops the others (JAX's default, 100).",
      lower_bound=1,
  )


def local_device_ids_for_task(environ) -> list[int] | None:
  """The GPU a cluster task should use, when JAX's own guess would be wrong.

  Under SLURM and Open MPI, JAX gives each process `local_device_ids=[its local rank]`, which
  is right when every task sees all of the node's GPUs (one process per GPU). When the
  scheduler binds one GPU to each task (`--gpus-per-task=1`), CUDA_VISIBLE_DEVICES holds that
  one GPU, visible as device 0, and the local rank would name a device that does not exist.
  """
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  return [0] if len(visible) == 1 else None


def wants_distributed(mode: str, coordinator_address: str | None, environ) -> bool:
  """Whether to start jax.distributed: `on` always, `off` never, `auto` when a coordinator is
  given or a SLURM / Open MPI job runs more than one task (a one-task job runs alone)."""
  if mode in ("on", "off"):
    return mode == "on"
  several_tasks = any(
      int(environ.get(k) or "1") > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
  )
  return bool(coordinator_address) or several_tasks


def start():
  """jax.distributed.initialize when the job spans several processes (see --distributed)."""
  FLAGS = flags.FLAGS
  if not wants_distributed(FLAGS.distributed, FLAGS.coordinator_address, os.environ):
    return
  import jax  # lazy: main's start-up and --help stay free of jax

  jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      local_device_ids=local_device_ids_for_task(os.environ),
      heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
  )
  logging.info(
      "distributed: process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def is_writer() -> bool:
  """Whether this process writes a command's outputs (process 0): every process computes the
  same results, one writes them."""
  import jax  # lazy: main's start-up and --help stay free of jax

  return jax.process_index() == 0
