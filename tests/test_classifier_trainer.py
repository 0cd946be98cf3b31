"""The sample classifier's trainer (trainers/classifier.py) run directly on a tiny shapes set,
and the class probabilities and accuracy that sampling reports with it, against the classifier
applied here to images scaled as it was trained."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from configs import classifier as classifier_config
from vim_jax.data import pipeline, sources
from vim_jax.infra import runs
from vim_jax.sampling import generation
from vim_jax.trainers import classifier as classifier_trainer

STEPS, NUM_EVAL, CLASSES = 60, 40, 3  # 40 eval images in batches of 16: 8 padded rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 60-step classifier run on one device, on an easy 3-class shapes set (large shapes of 2
  colours on solid backgrounds) that it learns in that time: (config, workdir, its result)."""
  config = classifier_config.get_config()
  config.model.widths = (8, 16)
  config.optimizer.lr = 1e-2
  config.data.update(
      shapes_train_size=480,
      shapes_eval_size=64,
      num_workers=1,
      num_classes=CLASSES,
      shapes_num_colors=2,
      shapes_gradient=False,
      shapes_radius=(0.3, 0.4),
  )
  config.update(
      total_steps=STEPS, batch_size=16, eval_batch_size=16, num_eval_images=NUM_EVAL, log_every=10
  )
  workdir = str(tmp_path_factory.mktemp("classifier"))
  result = classifier_trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  result = result.eval_metrics
  return config, workdir, result


def _eval_images(config):
  """The eval split's first 40 images (uint8 [40, 32, 32, 3], centre-cropped as the trainer's
  eval pipeline has them) and their labels [40]."""
  source = sources.build_source(config.data, "eval", config.image_size, config.seed)
  data = pipeline.InputPipeline(
      source,
      NUM_EVAL,
      config.image_size,
      config.seed,
      train=False,
      num_workers=1,
      max_examples=NUM_EVAL,
  )
  batch = next(data.iterate())
  assert batch["mask"].all()
  return batch["image"], batch["label"]


def _logits(model, params, images_uint8):
  """float64 logits [N, C] of the classifier on uint8 images mapped to [-1, 1] by x / 127.5 - 1,
  the range its trainer feeds it (parallel.global_batch_from_local's from_uint8)."""
  scaled = images_uint8.astype(np.float64) / 127.5 - 1.0
  return np.asarray(_apply(model)(params, scaled.astype(np.float32)), np.float64)


@functools.lru_cache(maxsize=None)
def _apply(model):
  return jax.jit(lambda params, images: model.apply({"params": params}, images))


def _softmax(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _cross_entropy(logits, labels):
  return float(np.mean(-np.log(_softmax(logits)[np.arange(len(labels)), labels])))


def test_the_trainer_learns_reports_its_unpadded_eval_accuracy_and_writes_a_loadable_run(run):
  """After 60 steps the eval cross-entropy (computed here from the logits) is well below that
  of the initial params (the seed's, rebuilt here) and chance's (ln 3), and the accuracy above
  chance; the returned accuracy is the argmax's over the 40 real eval images, not the 48 rows
  of the padded batches; the workdir holds config.json, num_classes.json and the step-60
  checkpoint, which runs.load_classifier restores."""
  config, workdir, result = run
  images, labels = _eval_images(config)
  model, params = runs.load_classifier(workdir)
  assert model.num_classes == CLASSES and model.widths == (8, 16)
  logits = _logits(model, params, images)
  assert result["num_images"] == NUM_EVAL
  assert result["accuracy"] == np.mean(np.argmax(logits, -1) == labels)
  tx = classifier_trainer.build_optimizer(config)
  initial = jax.jit(classifier_trainer.make_init_fn(model, tx, config.image_size))(
      jax.random.key(config.seed)
  ).params
  before, after = (_cross_entropy(_logits(model, p, images), labels) for p in (initial, params))
  print(
      f"\neval cross-entropy: {before:.3f} at init, {after:.3f} after {STEPS} steps; "
      f"accuracy {result['accuracy']:.3f}"
  )
  assert after < min(before, np.log(CLASSES)) - 0.15, (before, after)
  assert result["accuracy"] >= 0.5  # chance: 1/3
  assert json.load(open(os.path.join(workdir, "num_classes.json"))) == {"num_classes": CLASSES}
  assert runs.read_run_config(workdir, "classifier").total_steps == STEPS
  assert runs.checkpoint_steps(workdir) == [STEPS]


def test_class_probabilities_and_accuracy_score_images_as_the_classifier_was_trained(run):
  """generation.class_probabilities of uint8 images (in batches of 16, the last one partial)
  equals the softmax of the classifier applied here to the images mapped to [-1, 1], and
  class_accuracy is its argmax's accuracy, which is the trainer's own eval accuracy on the same
  images. Pixels scaled otherwise inside class_probabilities (e.g. x / 255) fail here."""
  config, workdir, result = run
  images, labels = _eval_images(config)
  model, params = runs.load_classifier(workdir)
  expected = _softmax(_logits(model, params, images))
  probs = generation.class_probabilities(model, params, images, batch_size=16)
  assert probs.shape == (NUM_EVAL, CLASSES)
  np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
  accuracy = generation.class_accuracy(model, params, images, labels)
  assert accuracy == np.mean(np.argmax(expected, -1) == labels) == result["accuracy"]


def test_a_rerun_of_a_finished_run_restores_it_and_reports_the_same_accuracy(run):
  """The quickstart reruns every stage after a stop; a finished classifier trains no step then,
  and still reports its accuracy (of the restored state: the same as the first run's)."""
  config, workdir, result = run
  again = classifier_trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert int(again.state.step) == STEPS and again.train_metrics == []
  assert again.eval_metrics == result
