"""Reading what a run wrote and how a command is started, shared by the tests: TensorBoard
scalars, the eval split's images, a command's environment."""

from __future__ import annotations

import glob
import os

import numpy as np


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
  return preprocess.to_unit_range(
      np.concatenate([b["image"][b["mask"].astype(bool)] for b in eval_data.iterate()]))


def cli_env(devices: int | None = None) -> dict:
  """A command's environment: the suite's, with one CPU device (as a user's shell has) or
  `devices` virtual ones instead of the suite's 8, and the suite's other XLA flags."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]  # the conftest's rest
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  return env
