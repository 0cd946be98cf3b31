"""Stage-2 trainer: VIM, the autoregressive Transformer over a frozen tokenizer's tokens.

`train_and_evaluate(config, workdir)` reads top to bottom like the tokenizer trainer: start-up,
the frozen tokenizer, VIM and its optimizer, sharded state (fresh or resumed), compiled steps,
the evaluation, then the shared loop (trainers/loop.py). Images are augmented by the input
pipeline and tokenized inside the sharded train step (the paper's way), so no pre-tokenized
copy of the data is needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from vim_jax.evaluators import fid, paper_metrics
from vim_jax.infra import parallel, runs, visualize
from vim_jax.models import tokenizer as tokenizer_lib
from vim_jax.sampling import generation
from vim_jax.trainers import compiling, loop, microbatch, train_state, vim_step

log = logging.getLogger(__name__)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    should_stop: Callable[[int], bool] | None = None,
    devices: list[jax.Device] | None = None,
) -> loop.RunResult:
  """Trains VIM for config.total_steps on a frozen tokenizer, resuming from workdir."""
  if not config.tokenizer_workdir:
    raise ValueError(
        "config.tokenizer_workdir is empty; point it at a stage-1 workdir, e.g. "
        "--config.tokenizer_workdir=workdirs/vitvq_base"
    )
  run = loop.start(config, workdir, devices)
  microbatch.check(config, run.data_parallel)  # grad_accum_steps against the mesh
  if config.model.num_classes and config.model.num_classes != run.train_data.num_classes:
    raise ValueError(
        f"config.model.num_classes={config.model.num_classes} but the dataset has "
        f"{run.train_data.num_classes} classes; set them equal (0 = "
        "unconditional)."
    )

  # --- Frozen tokenizer, model, optimizer and state ---------------------------------------------
  # The train and eval steps hold only the encoder and the codebook, sharded like the VIM's
  # params; the decoder is loaded (replicated) for the sample grids and FID samples alone.
  tok = runs.load_frozen_encoder(config.tokenizer_workdir, run.mesh, run.rules)
  decoder_params = runs.load_tokenizer(
      config.tokenizer_workdir, shardings=run.replicated, with_encoder=False
  ).params
  log.info(
      "tokenizer: %s step %d, %d tokens per image, codebook %d",
      config.tokenizer_workdir,
      tok.step,
      tok.num_tokens,
      tok.model.codebook_size,
  )
  model = vim_step.build_model(config, tok.model)
  tx, schedule = vim_step.build_optimizer(config)
  state, state_shardings, abstract_state, latest = train_state.create_or_restore_state(
      vim_step.make_init_fn(model, tx, run.data_parallel),
      config.seed,
      run.mesh,
      run.rules,
      run.ckpt,
  )
  log.info("VIM parameters: %.2fM", tokenizer_lib.count_params(state.params) / 1e6)
  if run.is_main:
    train_state.log_parameter_overview(state.params)

  # --- Compiled steps -----------------------------------------------------------------------------
  tok_shardings = jax.tree.map(lambda x: x.sharding, tok.params)
  spec = lambda b: vim_step.batch_spec(config, b, tok.num_tokens, run.batch_sharding)
  train_steps, step_flops = loop.compile_train_steps(
      run,
      {
          "train": vim_step.make_train_step(
              model, tok.model, tx, schedule, config, run.data_parallel
          )
      },
      state_shardings,
      abstract_state,
      spec(config.batch_size),
      (tok.params,),
      (tok_shardings,),
  )
  with parallel.tracing_context(run.mesh, run.rules):
    eval_step = jax.jit(
        vim_step.make_eval_step(model, tok.model),
        in_shardings=(state_shardings.params, run.batch_sharding, tok_shardings),
    )
    eval_step, _ = compiling.compile_step(
        eval_step, abstract_state.params, spec(config.eval_batch_size), tok.params
    )
  # Two batch sizes of one sampler program: the grid's few images (rounded up to the data-parallel
  # size) at every eval, and eval_batch_size for gFID's many.
  samplers = {
      name: generation.Sampler.for_training(
          model,
          tok.model,
          decoder_params,
          vim_step.sampling_config_from(config),
          batch_size,
          run.mesh,
          run.rules,
          state_shardings.params,
      )
      for name, batch_size in (
          ("grid", -(-config.num_grid_images // run.data_parallel) * run.data_parallel),
          ("fid", config.eval_batch_size),
      )
  }
  class_cycle = np.arange(max(model.num_classes, 1), dtype=np.int32)

  # --- Evaluation ---------------------------------------------------------------------------------
  # gFID / IS of fid.num_images class-balanced samples every fid.every steps, against the
  # eval split's statistics (computed here, once) or fid.reference_stats.
  extractor = reference = None
  if config.fid.every > 0:
    extractor = fid.FeatureExtractor(
        config.fid.inception_weights, resize=config.fid.resize, batch_size=config.fid.batch_size
    )
    reference = paper_metrics.reference_stats(config, extractor, config.fid.reference_stats)
    reference_label = paper_metrics.reference_label_for(
        config.fid.reference_stats, config, reference
    )

  def evaluate(step: int, state, is_last: bool) -> dict | None:
    """The eval split's loss and a sample grid every eval_every steps, gFID / IS every
    fid.every steps, both at the end."""
    with_eval = step % config.eval_every == 0 or is_last
    with_fid = extractor is not None and (step % config.fid.every == 0 or is_last)
    metrics = {}
    for sampler in samplers.values():
      sampler.params = state.params
    if with_eval:
      metrics = vim_step.evaluate(eval_step, state.params, tok.params, run.eval_data, run.mesh)
      log.info(
          "eval at step %d on %d images: %s",
          step,
          metrics["num_images"],
          ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
      )
      images = samplers["grid"].generate(np.resize(class_cycle, config.num_grid_images), seed=step)
      grid = visualize.tile(images, columns=max(model.num_classes, 4))
      run.writer.write_images(step, {"samples": grid[None]})
      if run.is_main:
        visualize.save_png(grid, os.path.join(workdir, "images", f"samples_{step:08d}.png"))
    if with_fid:
      labels = np.resize(class_cycle, config.fid.num_images)
      feats = extractor.extract(
          samplers["fid"].batches(labels, seed=step), "samples", config.fid.num_images
      )
      against = f"{reference.description} ({reference.num_images or '?'} images)"
      results = paper_metrics.generator_metrics(feats, reference, reference_label, against, "")
      log.info(
          "FID at step %d: %s", step, ", ".join(f"{k}={v['value']:.4g}" for k, v in results.items())
      )
      metrics.update({k: v["value"] for k, v in results.items()})
    return metrics or None

  # --- The loop -----------------------------------------------------------------------------------
  def describe(scalars) -> str:
    return (
        f"loss {scalars['loss']:.4f} ({scalars['bits_per_token']:.3f} bits/token), "
        f"accuracy {scalars['accuracy']:.3f}"
    )

  return loop.train(
      run,
      state,
      latest,
      steps=train_steps,
      step_key=lambda step: "train",
      step_flops=step_flops,
      extra_args=(tok.params,),
      inputs=vim_step.model_inputs,
      describe=describe,
      evaluate=evaluate,
      checkpoint_every=config.checkpoint_every,
      tokens_per_example=tok.num_tokens,
      should_stop=should_stop,
  )
