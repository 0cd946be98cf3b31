"""Images from a trained VIM: KV-cached token sampling on every device, then the tokenizer's
decoder; classifier rejection sampling (paper Sec. 4.2) and class accuracy. The library behind
`python -m vim_jax.sample`, `evaluate` and the quickstart.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import jax
import numpy as np

from vim_jax.data import preprocess
from vim_jax.infra import fileio, parallel, runs, visualize
from vim_jax.sampling import autoregressive
from vim_jax.trainers import vim_step

log = logging.getLogger(__name__)


class Sampler:
  """A VIM and its tokenizer compiled once for sampling, sharded over the batch axes of `mesh`
  (default: all devices, data-parallel): the one sampler of commands, evaluation and training.

  batches(labels, seed) streams uint8 images [<= batch_size, S, S, 3]; batch i uses the key
  fold_in(key(seed), i), so a seed reproduces the samples."""

  def __init__(
      self,
      trained: runs.TrainedVIM,
      sampling_config: autoregressive.SamplingConfig,
      batch_size: int = 64,
      mesh=None,
  ):
    mesh = mesh or parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Decoding runs the unrolled layout (autoregressive.decoding_layout): converted once here
    # (on the host), not inside every compiled call.
    model, params = autoregressive.decoding_layout(trained.model, jax.device_get(trained.params))
    self._compile(
        model,
        trained.tokenizer.model,
        sampling_config,
        batch_size,
        mesh,
        params_sharding=replicated,
        rules=None,
    )
    self.params = parallel.replicate(params, mesh)
    self.tokenizer_params = parallel.replicate(trained.tokenizer.params, mesh)

  @classmethod
  def for_training(
      cls,
      model,
      tok_model,
      tokenizer_params,
      sampling_config,
      batch_size: int,
      mesh,
      rules,
      params_sharding,
  ) -> "Sampler":
    """A sampler over a training run's params, in their training layout and sharding (the
    trainer sets .params to its state's before each use; nothing is copied to the host)."""
    sampler = cls.__new__(cls)
    sampler._compile(model, tok_model, sampling_config, batch_size, mesh, params_sharding, rules)
    sampler.params, sampler.tokenizer_params = None, tokenizer_params
    return sampler

  def _compile(self, model, tok_model, sampling_config, batch_size, mesh, params_sharding, rules):
    self.mesh, self.rules = mesh, rules
    dp = parallel.data_parallel_size(mesh)
    self.batch_size = max(dp, batch_size // dp * dp)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.label_sharding = parallel.batch_sharding(mesh)
    self._sample = jax.jit(
        vim_step.make_sample_fn(model, tok_model, sampling_config),
        in_shardings=(params_sharding, replicated, self.label_sharding, None),
    )

  def num_batches(self, num_samples: int) -> int:
    return -(-num_samples // self.batch_size)

  def batch(self, labels: np.ndarray, seed: int, index: int) -> np.ndarray:
    """uint8 images of batch `index` of `labels` (rows index * batch_size ...): the same
    images whether the batches before it were drawn or not (a resumed evaluation)."""
    chunk = labels[index * self.batch_size : (index + 1) * self.batch_size]
    padded = np.resize(chunk, self.batch_size).astype(np.int32)  # the last batch repeats
    with contextlib.ExitStack() as stack:
      if self.rules is not None:  # a training layout's activation constraints need the mesh
        stack.enter_context(parallel.tracing_context(self.mesh, self.rules))
      images = self._sample(
          self.params,
          self.tokenizer_params,
          jax.device_put(padded, self.label_sharding),
          jax.random.fold_in(jax.random.key(seed), index),
      )
    return preprocess.to_uint8(parallel.fetch(images))[: len(chunk)]

  def batches(self, labels: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    for i in range(self.num_batches(len(labels))):
      yield self.batch(labels, seed, i)

  def generate(self, labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 images [N, S, S, 3] for int labels [N]."""
    return np.concatenate(list(self.batches(labels, seed)))


def generate(
    trained: runs.TrainedVIM,
    labels: np.ndarray,
    seed: int,
    sampling_config: autoregressive.SamplingConfig,
    batch_size: int = 64,
) -> np.ndarray:
  """uint8 images [N, S, S, 3] for int labels [N] (see Sampler)."""
  return Sampler(trained, sampling_config, batch_size).generate(labels, seed)


@functools.partial(jax.jit, static_argnums=0)
def _predict(classifier, params, images):
  # One compiled function per (classifier, batch shape): callers score batch after batch.
  return jax.nn.softmax(classifier.apply({"params": params}, images), -1)


def class_probabilities(classifier, params, images: np.ndarray, batch_size: int = 256):
  """Softmax probabilities [N, C] of uint8 images [N, S, S, 3]."""
  probs = [
      _predict(classifier, params, preprocess.from_uint8(images[i : i + batch_size]))
      for i in range(0, len(images), batch_size)
  ]
  return np.concatenate([np.asarray(p) for p in probs])


def rejection_batches(
    sampler: Sampler,
    labels: np.ndarray,
    seed: int,
    classifier,
    classifier_params,
    acceptance: float,
):
  """Per requested class c, yields (positions of c in labels, kept images uint8 [n_c, S, S, 3],
  their probabilities of every class [n_c, C]): the n_c of ceil(n_c / acceptance) candidates
  that the classifier finds most likely to be c. One class's candidates are in memory at a
  time."""
  for c in np.unique(labels):
    where = np.nonzero(labels == c)[0]
    kept, probs = rejection_for_class(
        sampler, int(c), len(where), seed, classifier, classifier_params, acceptance
    )
    yield where, kept, probs


def rejection_for_class(
    sampler: Sampler, c: int, n: int, seed: int, classifier, classifier_params, acceptance: float
) -> tuple[np.ndarray, np.ndarray]:
  """The n of ceil(n / acceptance) samples of class c (seed seed * 1009 + c) that the
  classifier finds most likely to be c: (images uint8 [n, S, S, 3], their class probabilities
  [n, C])."""
  if not 0 < acceptance <= 1:
    raise ValueError(f"acceptance={acceptance}; expected a rate in (0, 1].")
  m = math.ceil(n / acceptance)
  candidates = sampler.generate(np.full(m, c, np.int32), seed * 1009 + c)
  probs = class_probabilities(classifier, classifier_params, candidates)
  best = np.argsort(-probs[:, c], kind="stable")[:n]
  return candidates[best], probs[best]


def rejection_sample(
    trained,
    labels: np.ndarray,
    seed: int,
    sampling_config,
    classifier,
    classifier_params,
    acceptance: float,
    batch_size: int = 64,
):
  """Keeps, per class, the n of ceil(n / acceptance) candidates most likely to be that class.

  Returns (images uint8 [N, S, S, 3] in the order of `labels`, probability of the requested
  class for each kept image [N]).
  """
  sampler = Sampler(trained, sampling_config, batch_size)
  images = np.zeros((len(labels), *(trained.config.image_size,) * 2, 3), np.uint8)
  scores = np.zeros(len(labels), np.float32)
  for where, kept, probs in rejection_batches(
      sampler, labels, seed, classifier, classifier_params, acceptance
  ):
    images[where], scores[where] = kept, probs[:, labels[where[0]]]
  return images, scores


def class_accuracy(classifier, classifier_params, images, labels) -> float:
  probs = class_probabilities(classifier, classifier_params, images)
  return float(np.mean(np.argmax(probs, -1) == labels))


def requested_labels(num_samples: int, num_classes: int, classes: str) -> np.ndarray:
  """Class-balanced labels: the given comma-separated classes, or all, cycled."""
  if num_classes == 0:
    return np.zeros(num_samples, np.int32)
  chosen = [int(c) for c in classes.split(",")] if classes else list(range(num_classes))
  bad = [c for c in chosen if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f"classes {bad} are outside 0..{num_classes - 1}.")
  return np.resize(np.asarray(chosen, np.int32), num_samples)


def sample_and_report(
    trained,
    out_dir: str,
    labels: np.ndarray,
    seed: int,
    sampling_config,
    classifier_workdir: str = "",
    acceptance: float = 1.0,
    batch_size: int = 64,
) -> dict:
  """Writes samples.png / samples.npz / results.json under out_dir; returns the results."""
  images = generate(trained, labels, seed, sampling_config, batch_size)
  results = {
      "num_samples": int(len(labels)),
      "seed": seed,
      "step": trained.step,
      "sampling": sampling_config.__dict__,
  }
  if classifier_workdir:
    classifier, classifier_params = runs.load_classifier(classifier_workdir)
    results["class_accuracy"] = class_accuracy(classifier, classifier_params, images, labels)
    if acceptance < 1:
      rejected, _ = rejection_sample(
          trained,
          labels,
          seed,
          sampling_config,
          classifier,
          classifier_params,
          acceptance,
          batch_size,
      )
      results["acceptance"] = acceptance
      results["class_accuracy_rejection"] = class_accuracy(
          classifier, classifier_params, rejected, labels
      )
      if jax.process_index() == 0:
        fileio.save_npz(
            fileio.join(out_dir, "samples_rejection.npz"), images=rejected, labels=labels
        )
        save_grid(rejected, labels, fileio.join(out_dir, "samples_rejection.png"))
  if jax.process_index() == 0:  # every process holds the same samples; one writes them
    fileio.save_npz(fileio.join(out_dir, "samples.npz"), images=images, labels=labels)
    save_grid(images, labels, fileio.join(out_dir, "samples.png"))
    fileio.write_json(fileio.join(out_dir, "results.json"), results)
    log.info("samples written to %s: %s", out_dir, results)
  return results


def save_grid(images: np.ndarray, labels: np.ndarray, path: str):
  """One column per class (rows = samples of that class), up to 8 rows."""
  classes = np.unique(labels)
  per_class = [images[labels == c][:8] for c in classes]
  rows = min(len(p) for p in per_class)
  ordered = np.stack([per_class[j][i] for i in range(rows) for j in range(len(classes))])
  visualize.save_png(visualize.tile(ordered, columns=len(classes)), path)
