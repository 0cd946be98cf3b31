"""The input pipeline: deterministic, per-process batches from an indexable source.

Every batch is a pure function of (seed, step): training positions step*B .. step*B+B-1 walk
through a fresh permutation of the source each epoch, and the augmentation of each example is
seeded by (seed, step, position). Resuming at step s therefore reproduces exactly the batches
an uninterrupted run would have seen, with nothing to checkpoint but the step.

Each process loads only the rows of the global batch that its devices hold
(`parallel.batch_rows`: a contiguous 1/P of the batch when only the batch axes span processes;
the same rows as another process when a tensor group spans two hosts), using a thread pool, and
batches are prefetched in a background thread. A row's example and augmentation depend on its
global position only, so processes that hold the same rows load identical examples. Corrupt
images are replaced by the next readable example, counted and reported, never fatal.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

from vim_jax.data import preprocess, sources
from vim_jax.infra import parallel

log = logging.getLogger(__name__)


class InputPipeline:
  """Batches of {'image': uint8 [b, S, S, 3], 'label': int32 [b], 'mask': float32 [b]} holding
  this process's `rows` of each global batch (b = len(rows); all of them by default); from a
  pre-tokenized source, 'tokens': int32 [b, N] instead of 'image'. Images stay uint8 until
  they are on the device (parallel.global_batch_from_local scales them to [-1, 1] there): a
  quarter of float32's host-to-device traffic.

  train=True: infinite, shuffled, augmented. train=False: one ordered pass over the source,
  the last batch padded with mask 0.
  """

  def __init__(
      self,
      source,
      global_batch_size: int,
      image_size: int,
      seed: int,
      train: bool,
      random_flip: bool = True,
      rows: np.ndarray | None = None,
      num_workers: int = 0,
      max_examples: int | None = None,
  ):
    if len(source) == 0:
      raise ValueError("the data source is empty.")
    self.rows = np.arange(global_batch_size) if rows is None else np.asarray(rows, np.int64)
    if len(self.rows) == 0 or self.rows.min() < 0 or self.rows.max() >= global_batch_size:
      raise ValueError(
          f"rows {self.rows[:8]}... must be non-empty and within the global batch "
          f"of {global_batch_size}."
      )
    self.source, self.global_batch_size, self.image_size = source, global_batch_size, image_size
    self.seed, self.train, self.random_flip = seed, train, random_flip
    self.local_batch_size = len(self.rows)
    self.num_examples = (
        len(source) if not max_examples or max_examples < 0 else min(len(source), max_examples)
    )
    # Source indices that failed to decode: never read again (a corrupt file stays corrupt),
    # counted and reported once each however many epochs pass over them.
    self._unreadable: set[int] = set()
    self._skip_lock = threading.Lock()
    self.num_workers = num_workers or available_cpus()
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
    self._perm_cache: tuple[int, np.ndarray] | None = None

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  @property
  def skipped_images(self) -> int:
    """Distinct unreadable files met so far by this process (logged as data/skipped_images)."""
    return len(self._unreadable)

  @property
  def steps_per_epoch(self) -> int:
    """Training: batches per pass over the data; eval: batches in the one pass."""
    return math.ceil(self.num_examples / self.global_batch_size)

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm_cache = (epoch, rng.permutation(self.num_examples))
    return self._perm_cache[1]

  def _global_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and validity mask of the global batch at `step`: both [B]."""
    positions = step * self.global_batch_size + np.arange(self.global_batch_size)
    if not self.train:
      valid = positions < self.num_examples
      return np.where(valid, positions, 0), valid
    epochs = positions // self.num_examples
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      indices[sel] = self._permutation(int(epoch))[positions[sel] % self.num_examples]
    return indices, np.ones_like(positions, dtype=bool)

  def _load(self, index: int, step: int, position: int) -> dict[str, np.ndarray]:
    for attempt in range(100):
      candidate = (index + attempt) % len(self.source)
      if candidate in self._unreadable:
        continue  # replaced by the next readable one, as when it was first found corrupt
      try:
        example = self.source[candidate]
        break
      except sources.CorruptImageError as e:
        with self._skip_lock:
          first_time = candidate not in self._unreadable
          self._unreadable.add(candidate)
          count = len(self._unreadable)
        if first_time:  # two threads may hit the same file in one batch
          log.warning("skipping unreadable image (%d distinct files so far): %s", count, e)
    else:
      raise RuntimeError(
          f"100 consecutive unreadable images from index {index}; is the dataset path right?"
      )
    if "tokens" in example:  # a pre-tokenized source: nothing to preprocess
      return {"tokens": np.asarray(example["tokens"], np.int32), "label": example["label"]}
    rng = np.random.default_rng([self.seed, step, position]) if self.train else None
    image = preprocess.preprocess_image(example["image"], self.image_size, rng, self.random_flip)
    return {"image": image, "label": example["label"]}

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch at `step`."""
    indices, valid = self._global_indices(step)
    futures = [
        self._pool.submit(self._load, int(indices[row]), step, int(row)) for row in self.rows
    ]
    examples = [f.result() for f in futures]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "label"}
    batch["label"] = np.asarray([e["label"] for e in examples], np.int32)
    batch["mask"] = valid[self.rows].astype(np.float32)
    return batch

  def iterate(
      self, start_step: int = 0, num_steps: int | None = None, prefetch: int = 2
  ) -> Iterator[dict[str, np.ndarray]]:
    """Local batches for steps start_step, start_step+1, ... (eval: to the end of the pass),
    prepared `prefetch` batches ahead in a background thread."""
    if num_steps is None:
      num_steps = self.steps_per_epoch - start_step if not self.train else 1 << 62
    stop = start_step + num_steps
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    done = threading.Event()

    def producer():
      try:
        for step in range(start_step, stop):
          if done.is_set():
            return
          out.put(("batch", self.local_batch(step)))
        out.put(("end", None))
      except BaseException as e:  # surfaced in the consumer
        out.put(("error", e))

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
      while True:
        kind, item = out.get()
        if kind == "end":
          return
        if kind == "error":
          raise item
        yield item
    finally:
      done.set()
      while thread.is_alive():  # unblock a producer waiting on a full queue
        try:
          out.get_nowait()
        except queue.Empty:
          thread.join(timeout=0.05)


def available_cpus() -> int:
  """CPU cores this process may run on (its affinity mask: a container's or a SLURM task's
  share, not the whole machine's)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def build_pipelines(config, mesh=None):
  """(train, eval) InputPipelines from config.data, config.batch_size, config.image_size, each
  loading the rows of its batches that this process's devices hold in `mesh` (None: one
  process, every row)."""
  d = config.data
  train_source = sources.build_source(d, "train", config.image_size, config.seed)
  eval_source = sources.build_source(d, "eval", config.image_size, config.seed)
  common = dict(image_size=config.image_size, num_workers=d.num_workers)
  train_rows = rows_of(mesh, config.batch_size)
  if train_rows is not None and len(train_rows) < config.batch_size:
    log.info(
        "input: this process loads rows %s of each training batch of %d (the rows its "
        "devices hold)",
        describe_rows(train_rows),
        config.batch_size,
    )
  train = InputPipeline(
      train_source,
      config.batch_size,
      seed=config.seed,
      train=True,
      random_flip=d.random_flip,
      rows=train_rows,
      **common,
  )
  evaluation = InputPipeline(
      eval_source,
      config.eval_batch_size,
      seed=config.seed,
      train=False,
      max_examples=config.num_eval_images,
      rows=rows_of(mesh, config.eval_batch_size),
      **common,
  )
  return train, evaluation


def describe_rows(rows: np.ndarray) -> str:
  """Sorted rows as runs: '[0..63, 256..319]'."""
  breaks = np.flatnonzero(np.diff(rows) != 1)
  starts = np.concatenate([[0], breaks + 1])
  ends = np.concatenate([breaks, [len(rows) - 1]])
  return "[" + ", ".join(f"{rows[s]}..{rows[e]}" for s, e in zip(starts, ends)) + "]"


def rows_of(mesh, global_batch_size: int) -> np.ndarray | None:
  """This process's rows of a global batch laid over `mesh` (None = all: one process)."""
  if mesh is None:
    if jax.process_count() > 1:
      raise ValueError(
          "several processes: pass the mesh, whose sharding says which batch "
          "rows each process loads."
      )
    return None
  return parallel.batch_rows(mesh, global_batch_size)
