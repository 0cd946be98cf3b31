"""Reading what a run wrote and how a command is started, shared by the tests: TensorBoard
scalars, the eval split's images, a command's environment."""

from __future__ import annotations

import glob
import os
import socket
import subprocess

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def event_scalars(folder: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in folder's TensorBoard event files (image grids,
  also summaries, are left out)."""
  import tensorflow as tf

  values: dict[str, dict[int, float]] = {}
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if array.ndim == 0:
          values.setdefault(value.tag, {})[event.step] = float(array)
  return values


def eval_images(config) -> np.ndarray:
  """The run's eval images exactly as its eval pass sees them: float [N, S, S, 3] in [-1, 1],
  padding removed."""
  from vim_jax.data import pipeline, preprocess

  _, eval_data = pipeline.build_pipelines(config)
  return preprocess.from_uint8(
      np.concatenate([b["image"][b["mask"].astype(bool)] for b in eval_data.iterate()])
  )


def cli_env(devices: int | None = None) -> dict:
  """A command's environment: the suite's, with one CPU device (as a user's shell has) or
  `devices` virtual ones instead of the suite's 8, and the suite's other XLA flags."""
  env = dict(os.environ)
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]  # the conftest's rest
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(count, command, log_dir, devices_per_process=4, env=None):
  """Runs command(0) ... command(count - 1) together; their log files, once all exit 0."""
  procs, logs = [], []
  for i in range(count):
    logs.append(os.path.join(log_dir, f"process{i}.log"))
    procs.append(
        subprocess.Popen(
            command(i),
            cwd=REPO_ROOT,
            env={**cli_env(devices_per_process), **(env(i) if env else {})},
            stdout=open(logs[-1], "w"),
            stderr=subprocess.STDOUT,
        )
    )
  try:
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, log in zip(codes, logs):
    text = open(log).read()
    errors = [line for line in text.splitlines() if "Error" in line]  # a long array can hide it
    assert code == 0, "\n".join(errors[-5:]) + "\n...\n" + text[-3000:]
  return logs
