"""Linear probe on VIM features (paper Sec. 4.3): representation learning from a frozen VIM.

Features of an image: its tokens run through the frozen VIM (with the null condition, so a
class-conditional model sees no label), the output of one block averaged over the sequence.
A class-conditional VIM trained with label_dropout = 0 never saw the null condition, so its
features under it mean nothing: the probe refuses such a run (UntrainedNullCondition); probe
an unconditional VIM or one trained with label_dropout > 0 (the configs' default is 0.1).
A linear softmax classifier is trained on the train split's features with optax; top-1 on the
eval split is the probe accuracy.

  python -m vim_jax.probe --workdir=workdirs/vim [--blocks=2,4]

prints a table of top-1 per block (default: config.probe.block and the last block). On a
multi-host slice every worker runs the same command (the --distributed flags are main's): each
process reads and featurizes the rows its devices hold, and process 0 writes probe.json.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from vim_jax.data import pipeline, sources
from vim_jax.infra import distributed, fileio, log_filters, parallel, runs
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.models import vim as vim_lib

log = logging.getLogger(__name__)


def data_parallel_mesh():
  """Every device on the batch: the probe's forward passes hold the whole model per device."""
  return parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))


def extract_features(
    trained: runs.TrainedVIM, data: pipeline.InputPipeline, blocks: list[int]
) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """One ordered pass over `data` (built with rows_of(data_parallel_mesh())): ({block:
  features [N, D]}, labels [N])."""
  mesh = data_parallel_mesh()
  model, tok = trained.model, trained.tokenizer

  @jax.jit
  def features(params, tok_params, images):
    tokens = tok.model.apply(
        {"params": tok_params}, images, method=tokenizer_lib.ViTVQGAN.encode_to_indices
    )
    tokens = tokens.reshape(tokens.shape[0], -1)
    null = jnp.full((tokens.shape[0],), model.null_label, jnp.int32)
    return {
        b: model.apply({"params": params}, tokens, null, b, method=vim_lib.VIM.features)
        for b in blocks
    }

  params = parallel.replicate(trained.params, mesh)
  tok_params = parallel.replicate(tok.params, mesh)
  feats: dict[int, list] = {b: [] for b in blocks}
  labels = []
  for local in data.iterate():
    batch = parallel.global_batch_from_local(local, mesh, data.global_batch_size)
    out, label, mask = parallel.fetch(
        (features(params, tok_params, batch["image"]), batch["label"], batch["mask"])
    )
    mask = mask.astype(bool)
    for b in blocks:
      feats[b].append(out[b][mask])
    labels.append(label[mask])
  return {b: np.concatenate(f) for b, f in feats.items()}, np.concatenate(labels)


def standardise(train_x: np.ndarray, eval_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both splits shifted and scaled by the train split's per-feature mean and std (the eval
  split's own statistics would leak its distribution into the probe)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  return (train_x - mean) / std, (eval_x - mean) / std


def train_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
  """Trains softmax(x W + b) with Adam on standardised features; returns eval top-1."""
  train_x, eval_x = standardise(train_x, eval_x)
  params = {"w": jnp.zeros((train_x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  tx = optax.adamw(
      optax.cosine_decay_schedule(lr, steps),
      weight_decay=weight_decay,
      mask={"w": True, "b": False},
  )
  opt_state = tx.init(params)
  train_x, train_y = jnp.asarray(train_x), jnp.asarray(train_y)

  @jax.jit
  def step(params, opt_state, rng):
    idx = jax.random.randint(rng, (batch_size,), 0, train_x.shape[0])

    def loss_fn(p):
      logits = train_x[idx] @ p["w"] + p["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, train_y[idx]).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = jax.random.key(seed)
  for i in range(steps):
    params, opt_state = step(params, opt_state, jax.random.fold_in(rng, i))
  predictions = np.argmax(np.asarray(eval_x @ params["w"] + params["b"]), -1)
  return float(np.mean(predictions == eval_y))


class UntrainedNullCondition(ValueError):
  """A class-conditional VIM whose null condition, the probe's input, was never trained."""


def check_null_condition_trained(config, workdir: str):
  """Raises UntrainedNullCondition for a class-conditional run trained without label dropout."""
  if config.model.num_classes and config.label_dropout <= 0:
    raise UntrainedNullCondition(
        f"{workdir!r} holds a class-conditional VIM trained with label_dropout="
        f"{config.label_dropout}: its null condition, which the probe feeds so that "
        "the features see no label, was never trained. Probe an unconditional VIM "
        "(model.num_classes=0) or a class-conditional one trained with label_dropout > 0 "
        "(e.g. --config.label_dropout=0.1, the configs' default)."
    )


def run_probe(workdir: str, blocks: list[int] | None = None) -> dict[int, float]:
  """Probe accuracy for each block of a stage-2 workdir, using its config.probe settings."""
  check_null_condition_trained(runs.read_run_config(workdir, "vim"), workdir)
  trained = runs.load_vim(workdir)
  config, p = trained.config, trained.config.probe
  last = trained.model.stack.num_layers
  blocks = sorted(set(blocks or [p.block, last]))
  built = {
      split: sources.build_source(config.data, split, config.image_size, config.seed)
      for split in ("train", "eval")
  }
  passes = {
      split: pipeline.InputPipeline(
          built[split],
          config.eval_batch_size,
          config.image_size,
          config.seed,
          train=False,
          rows=pipeline.rows_of(data_parallel_mesh(), config.eval_batch_size),
          num_workers=config.data.num_workers,
          max_examples=p.num_train_images if split == "train" else p.num_eval_images,
      )
      for split in ("train", "eval")
  }
  train_feats, train_y = extract_features(trained, passes["train"], blocks)
  eval_feats, eval_y = extract_features(trained, passes["eval"], blocks)
  num_classes = built["train"].num_classes
  results = {}
  for b in blocks:
    results[b] = train_linear_probe(
        train_feats[b],
        train_y,
        eval_feats[b],
        eval_y,
        num_classes,
        p.steps,
        p.batch_size,
        p.lr,
        p.weight_decay,
        config.seed,
    )
    log.info(
        "linear probe, block %d of %d: top-1 %.4f (%d train / %d eval images)",
        b,
        last,
        results[b],
        len(train_y),
        len(eval_y),
    )
  return results


def format_table(results: dict[int, float], num_layers: int) -> str:
  rows = ["| block | top-1 |", "|---|---|"]
  rows += [f"| {b} of {num_layers} | {100 * acc:.1f}% |" for b, acc in sorted(results.items())]
  return "\n".join(rows)


def main(argv):
  del argv
  log_filters.install()
  FLAGS = flags.FLAGS
  distributed.start()
  blocks = [int(b) for b in FLAGS.blocks.split(",")] if FLAGS.blocks else None
  try:
    results = run_probe(FLAGS.workdir, blocks)
  except UntrainedNullCondition as e:
    raise SystemExit(f"error: {e}") from None
  trained_layers = runs.load_vim(FLAGS.workdir).model.stack.num_layers
  if distributed.is_writer():  # every process trained the same probe on the same features
    print(format_table(results, trained_layers))
    fileio.write_json(
        fileio.join(FLAGS.workdir, "probe.json"), {str(k): v for k, v in results.items()}
    )


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A stage-2 (VIM) workdir.")
  flags.DEFINE_string(
      "blocks",
      "",
      "Comma-separated 1-based blocks to probe; default config.probe.block and the last block.",
  )
  distributed.define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
