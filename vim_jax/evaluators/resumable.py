"""A long evaluation's progress, in shards, so that the same command started again after a
preemption (SIGTERM) or a crash (SIGKILL) continues where it stopped and ends with the numbers
an uninterrupted run gives.

  OUT/progress_<step>/
    identity.json              what is being computed (workdir, step, seed, samples, sampling,
                               batch, Inception, classifier); a rerun with other settings is
                               refused rather than mixed with it
    <phase>-<unit:06d>.npz     one per finished unit of work (a batch of samples; one class of
                               rejection sampling): that unit's Inception features and counts

The evaluation is a fixed sequence of units whose inputs depend only on their index (batch i
draws with fold_in(key(seed), i)), and the statistics are accumulated in unit order. A resumed
run therefore replays the saved units' features through the same float64 accumulation, then
computes the rest: its FID, IS and accuracies equal an uninterrupted run's exactly. A unit's
shard is written whole (fileio writes a temporary file and renames it) by process 0 alone;
every process computes the same features. The folder is removed once the results are written.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from vim_jax.infra import fileio

log = logging.getLogger(__name__)


class IdentityMismatch(ValueError):
  """OUT holds the progress of an evaluation with other settings."""


class ShardedProgress:
  """Shards of one evaluation under `directory` (see the module docstring)."""

  def __init__(self, directory: str, identity: dict):
    self.directory = directory
    identity = json.loads(json.dumps(identity))  # as it reads back (lists, not tuples)
    self.writer = jax.process_index() == 0
    path = fileio.join(directory, "identity.json")
    if fileio.exists(path):
      saved = fileio.read_json(path)
      if saved != identity:
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise IdentityMismatch(
            f"{directory} holds the progress of another evaluation: "
            + "; ".join(f"{k} was {saved.get(k)!r}, now {identity.get(k)!r}" for k in changed)
            + ". Rerun with the earlier settings to continue it, or delete that folder (or "
            "pass another --out) to start over."
        )
    elif self.writer:
      fileio.makedirs(directory)
      fileio.write_json(path, identity)

  def _path(self, phase: str, unit: int) -> str:
    return fileio.join(self.directory, f"{phase}-{unit:06d}.npz")

  def finished_units(self, phase: str) -> int:
    """How many units of `phase` have their shard, counted from unit 0 (a later shard after a
    gap is redone). Process 0 looks, and every process gets its answer, so that all of them
    resume at the same unit."""
    count = 0
    if self.writer:
      while fileio.exists(self._path(phase, count)):
        count += 1
    if jax.process_count() > 1:
      count = int(multihost_utils.broadcast_one_to_all(np.int32(count)))
    return count

  def load(self, phase: str, unit: int) -> dict[str, np.ndarray]:
    """A finished unit's arrays. Every process reads them (a shared workdir: gs:// or NFS)."""
    return fileio.load_npz(self._path(phase, unit))

  def save(self, phase: str, unit: int, **arrays: np.ndarray):
    if self.writer:
      fileio.save_npz(self._path(phase, unit), **arrays)

  def remove(self):
    """Deletes the shards (after the results are written)."""
    if self.writer and fileio.exists(self.directory):
      fileio.path(self.directory).rmtree()
