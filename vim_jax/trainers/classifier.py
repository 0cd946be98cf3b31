"""Trainer for the small image classifier used to score samples (rejection sampling, sample
accuracy) where no pretrained classifier exists, e.g. on the embedded shapes dataset.

`train_and_evaluate(config, workdir)` trains with AdamW and cross-entropy on the shared loop
(trainers/loop.py), evaluates top-1 on the eval split at the end and checkpoints like the other
trainers; `runs.load_classifier(workdir)` restores it.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vim_jax.infra import fileio, parallel
from vim_jax.models import classifier as classifier_lib
from vim_jax.trainers import loop, optim, train_state

log = logging.getLogger(__name__)


def build_optimizer(config):
  schedule = optax.cosine_decay_schedule(config.optimizer.lr, max(config.total_steps, 1))
  return optax.adamw(
      schedule, weight_decay=config.optimizer.weight_decay, mask=optim.decay_weights_only
  )


def make_init_fn(model, tx, image_size: int):
  def init(rng):
    params = model.init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
    return train_state.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  return init


def make_train_step(model, tx):
  """(state, batch) -> (state, metrics); batch: image [B, S, S, 3] in [-1, 1], label int [B]."""

  def train_step(state, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["image"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (
        state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        ),
        {"loss": loss, "accuracy": acc},
    )

  return train_step


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, should_stop=None, devices=None
) -> loop.RunResult:
  """Trains for config.total_steps; eval_metrics: {'accuracy': eval top-1, 'num_images'}."""
  run = loop.start(config, workdir, devices)
  model = classifier_lib.ConvClassifier.from_config(config, run.train_data.num_classes)
  tx = build_optimizer(config)
  state, state_shardings, abstract_state, latest = train_state.create_or_restore_state(
      make_init_fn(model, tx, config.image_size), config.seed, run.mesh, run.rules, run.ckpt
  )
  if run.is_main:
    fileio.write_json(
        fileio.join(workdir, "num_classes.json"), {"num_classes": run.train_data.num_classes}
    )

  b, s = config.batch_size, config.image_size
  batch_spec = {
      "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=run.batch_sharding),
      "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=run.batch_sharding),
  }
  train_steps, step_flops = loop.compile_train_steps(
      run, {"train": make_train_step(model, tx)}, state_shardings, abstract_state, batch_spec
  )
  predict = jax.jit(lambda params, images: jnp.argmax(model.apply({"params": params}, images), -1))

  def top1(state) -> dict:
    correct = count = 0
    for local in run.eval_data.iterate():
      batch = parallel.global_batch_from_local(local, run.mesh, config.eval_batch_size)
      pred, labels, mask = parallel.fetch(
          (predict(state.params, batch["image"]), batch["label"], batch["mask"])
      )
      mask = mask.astype(bool)
      correct += int(np.sum((pred == labels)[mask]))
      count += int(mask.sum())
    log.info("classifier eval top-1 %.4f on %d images", correct / count, count)
    return {"accuracy": correct / count, "num_images": count}

  result = loop.train(
      run,
      state,
      latest,
      steps=train_steps,
      step_key=lambda step: "train",
      step_flops=step_flops,
      inputs=lambda local: {"image": local["image"], "label": local["label"]},
      describe=lambda s: f"loss {s['loss']:.4f}, accuracy {s['accuracy']:.3f}",
      evaluate=lambda step, state, is_last: top1(state) if is_last else None,
      checkpoint_every=config.total_steps,
      should_stop=should_stop,
  )
  if result.eval_metrics is None:
    # Stopped early, or restored at its last step (a rerun quickstart): callers still read
    # the accuracy of the state they get.
    result.eval_metrics = top1(result.state)
    run.writer.write_scalars(
        int(result.state.step), {f"eval/{k}": v for k, v in result.eval_metrics.items()}
    )
    run.writer.flush()
  return result
