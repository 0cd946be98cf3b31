"""Tokenizes a dataset once with a trained stage-1 tokenizer, into sharded .npy files.

  python -m vim_jax.tools.pretokenize --config=configs/vim_base.py \
      --config.tokenizer_workdir=workdirs/vitvq_base --out=gs_or_local/tokens [--shard_size=50000]

Reads the images described by the config's `data` section (centre crop, no augmentation),
writes {train,eval}-NNNNN.tokens.npy (int32 [n, N]) and .labels.npy plus meta.json, and then
stage 2 trains on them with --config.data.source=tokens --config.data.tokens_dir=<out>.
This trades the paper's on-the-fly augmentation for not running the tokenizer every step.
On a multi-host slice every worker runs the same command (the --distributed flags are main's):
each process tokenizes the rows its devices hold, and process 0 writes the shards.
"""

from __future__ import annotations

import json
import logging
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vim_jax.data import pipeline, sources
from vim_jax.infra import config_files, distributed, fileio, log_filters, parallel, runs
from vim_jax.models import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


def pretokenize(
    config, out_dir: str, shard_size: int = 50_000, splits: tuple[str, ...] = ("train", "eval")
) -> dict:
  """Writes the token shards and meta.json; returns the meta dict."""
  tok = runs.load_tokenizer(config.tokenizer_workdir, with_decoder=False)
  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  params = parallel.replicate(tok.params, mesh)
  encode = jax.jit(
      lambda p, x: tok.model.apply(
          {"params": p}, x, method=tokenizer_lib.ViTVQGAN.encode_to_indices
      )
  )
  fileio.makedirs(out_dir)
  meta = {
      "tokenizer_workdir": config.tokenizer_workdir,
      "tokenizer_step": tok.step,
      "grid": list(tok.grid),
      "codebook_size": tok.model.codebook_size,
      "image_size": config.image_size,
      "counts": {},
  }
  batch = max(parallel.data_parallel_size(mesh), config.eval_batch_size)
  for split in splits:
    source = sources.build_source(config.data, split, config.image_size, config.seed)
    meta["num_classes"] = source.num_classes
    data = pipeline.InputPipeline(
        source,
        batch,
        config.image_size,
        config.seed,
        train=False,
        rows=pipeline.rows_of(mesh, batch),
        num_workers=config.data.num_workers,
    )
    tokens, labels, shard, count = [], [], 0, 0

    def flush():
      nonlocal tokens, labels, shard
      if not tokens or jax.process_index() != 0:
        return
      stem = fileio.join(out_dir, f"{split}-{shard:05d}")
      fileio.save_npy(stem + ".labels.npy", np.concatenate(labels))
      # Written last: marks the shard complete.
      fileio.save_npy(stem + ".tokens.npy", np.concatenate(tokens))
      shard, tokens, labels = shard + 1, [], []

    for local in data.iterate():
      device_batch = parallel.global_batch_from_local(local, mesh, batch)
      idx, label, mask = parallel.fetch(
          (encode(params, device_batch["image"]), device_batch["label"], device_batch["mask"])
      )
      mask = mask.astype(bool)
      tokens.append(idx.reshape(idx.shape[0], -1)[mask].astype(np.int32))
      labels.append(label[mask])
      count += int(mask.sum())
      if sum(len(t) for t in tokens) >= shard_size:
        flush()
      log.info("%s: %d / %d images tokenized", split, count, data.num_examples)
    flush()
    meta["counts"][split] = count
  if jax.process_index() == 0:
    fileio.write_json(fileio.join(out_dir, "meta.json"), meta)
  return meta


def main(argv):
  del argv
  log_filters.install()
  FLAGS = flags.FLAGS
  distributed.start()
  meta = pretokenize(FLAGS.config, FLAGS.out, FLAGS.shard_size)
  if distributed.is_writer():
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
      "config",
      None,
      "A stage-2 config (its data and tokenizer_workdir are used).",
      lock_config=True,
  )
  flags.DEFINE_string("out", None, "Output folder for the token shards.")
  flags.DEFINE_integer("shard_size", 50_000, "Images per shard file.", lower_bound=1)
  distributed.define_flags()
  flags.mark_flags_as_required(["config", "out"])
  config_files.add_config_roots(sys.argv)  # `from configs import common`, from any folder
  app.run(main)
