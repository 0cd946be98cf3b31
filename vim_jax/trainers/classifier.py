"""Trainer for the small image classifier used to score samples (rejection sampling, sample
accuracy) where no pretrained classifier exists, e.g. on the embedded shapes dataset.

`train_and_evaluate(config, workdir)` trains with Adam and cross-entropy, evaluates top-1 on the
eval split, and checkpoints like the other trainers; `runs.load_classifier(workdir)` restores it.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.infra import checkpoint, fileio, parallel
from vim_jax.trainers import optim, train_lib
from vim_jax.data import pipeline
from vim_jax.models import classifier as classifier_lib

log = logging.getLogger(__name__)


TrainState = train_lib.TrainState


def build_optimizer(config):
  schedule = optax.cosine_decay_schedule(config.optimizer.lr, max(config.total_steps, 1))
  return optax.adamw(schedule, weight_decay=config.optimizer.weight_decay,
                     mask=optim.decay_weights_only)


def make_init_fn(model, tx, image_size: int):
  def init(rng):
    params = model.init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, should_stop=None,
                       devices=None):
  """Returns {'accuracy': eval top-1, 'num_images': ...} after config.total_steps."""
  # --- Logging, mesh, input -------------------------------------------------------------------
  writer = train_lib.open_workdir(workdir, config)
  mesh = parallel.create_mesh(config.mesh, devices)
  train_lib.check_divisible(mesh, batch_size=config.batch_size,
                            eval_batch_size=config.eval_batch_size)
  train_data, eval_data = pipeline.build_pipelines(config, mesh)
  # --- Model, optimizer, state ----------------------------------------------------------------
  model = classifier_lib.ConvClassifier.from_config(config, train_data.num_classes)
  tx = build_optimizer(config)
  replicated = NamedSharding(mesh, P())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  init = make_init_fn(model, tx, config.image_size)
  shapes = jax.eval_shape(init, jax.random.key(config.seed))
  shardings = jax.tree.map(lambda _: replicated, shapes)
  state, latest = ckpt.restore_latest(checkpoint.abstract_with_shardings(shapes, shardings))
  if state is None:
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))

  # --- Steps ----------------------------------------------------------------------------------
  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["image"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), {"loss": loss, "accuracy": acc})

  @jax.jit
  def predict(params, images):
    return jnp.argmax(model.apply({"params": params}, images), -1)

  # --- Loop -----------------------------------------------------------------------------------
  step, history = int(state.step), []
  for local in train_data.iterate(step, config.total_steps - step):
    batch = parallel.global_batch_from_local({"image": local["image"], "label": local["label"]},
                                             mesh, config.batch_size)
    state, metrics = train_step(state, batch)
    history.append(metrics)
    step += 1
    if step % config.log_every == 0 or step == config.total_steps:
      scalars = train_lib.mean_metrics(history)
      history = []
      train_lib.check_finite(scalars["loss"], step, latest)
      writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
      writer.flush()  # events reach TensorBoard at each log step, not only at the end
      log.info("classifier step %d/%d: loss %.4f, accuracy %.3f", step, config.total_steps,
               scalars["loss"], scalars["accuracy"])
    if (should_stop is not None and should_stop(step)) or train_lib.preemption_requested(step):
      break
  correct = count = 0
  for local in eval_data.iterate():
    batch = parallel.global_batch_from_local(local, mesh, config.eval_batch_size)
    pred, labels, mask = parallel.fetch((predict(state.params, batch["image"]), batch["label"],
                                         batch["mask"]))
    mask = mask.astype(bool)
    correct += int(np.sum((pred == labels)[mask]))
    count += int(mask.sum())
  result = {"accuracy": correct / count, "num_images": count}
  log.info("classifier eval top-1 %.4f on %d images", result["accuracy"], count)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
  ckpt.save(step, state, force=True)
  ckpt.close()
  if jax.process_index() == 0:
    fileio.write_json(fileio.join(workdir, "num_classes.json"),
                      {"num_classes": train_data.num_classes})
  writer.flush()
  return result
