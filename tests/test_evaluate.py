"""`python -m vim_jax.evaluate` and the trainers' periodic FID, with random-weight Inception."""

import glob
import json
import logging
import os
import subprocess
import sys

import jax
import metric_reference
import numpy as np
import pytest
import readme_commands
import run_files
from conftest import REPO_ROOT, tiny_vim_config

from vim_jax.evaluators import fid, paper_metrics
from vim_jax.infra import runs
from vim_jax.sampling import generation
from vim_jax.trainers import tokenizer as tokenizer_trainer
from vim_jax.trainers import vim as vim_trainer
from vim_jax.trainers import vim_step

STAGE1_METRICS = (
    "rfid_vs_shapes_eval",
    "is_of_reconstructions",
    "is_of_reconstructions_std",
    "psnr",
    "ssim",
    "l1",
    "l2",
    "codebook_usage",
    "codebook_usage_per_256",
    "perplexity",
)


def _one_device():
  """The CLI's layout (one device, as a user's shell), so that the recomputations below run
  the programs the CLI compiled: read back from the suite's compilation cache."""
  from vim_jax.infra import parallel

  return parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:1])


def test_stage1_evaluate_cli_writes_every_metric(tokenizer_dir, inception_files, tmp_path):
  """The README's stage-1 evaluate command, read from README.md and run from the root of a
  scratch copy of the repository (relative workdir, the Inception weights where the README's
  converter writes them)."""
  root = readme_commands.scratch_repository(str(tmp_path))
  workdir = readme_commands.copy_run(tokenizer_dir, root, "vitvq_base")
  weights = readme_commands.put_inception_weights(root, inception_files["flax"])
  real_path = os.path.join(root, "shapes_eval_stats.npz")
  command = readme_commands.find("python -m vim_jax.evaluate --workdir=workdirs/vitvq_base")
  proc = subprocess.run(
      readme_commands.to_argv(
          command, {}, extra=("--batch_size=16", "--save_reference_stats=shapes_eval_stats.npz")
      ),
      cwd=root,
      capture_output=True,
      text=True,
      timeout=600,
      env=run_files.cli_env(),
  )  # one device, as a user's shell
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(workdir, "eval")
  assert "rfid_vs_shapes_eval" in proc.stdout
  (path,) = glob.glob(os.path.join(out, "results_*.json"))
  results = json.load(open(path))
  metrics = results["metrics"]
  assert set(STAGE1_METRICS) <= set(metrics)
  assert all(m["num_images"] == 16 for m in metrics.values())
  assert metrics["rfid_vs_shapes_eval"]["against"] == "shapes_eval (16 images)"
  # The values, recomputed here: the eval images through the tokenizer, Inception features,
  # then FID, IS, usage and PSNR from their definitions (tests/metric_reference.py).
  from vim_jax.data import preprocess
  from vim_jax.models import tokenizer as tokenizer_lib

  tok = runs.load_tokenizer(tokenizer_dir)
  images = run_files.eval_images(tok.config)
  outputs = tok.model.apply({"params": tok.params}, images)
  indices = tok.model.apply(
      {"params": tok.params}, images, method=tokenizer_lib.ViTVQGAN.encode_to_indices
  )
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=16, mesh=_one_device())
  real_pool, _ = extractor(preprocess.to_uint8(images))
  recon = np.asarray(outputs["reconstruction"], np.float64)
  recon_pool, recon_probs = extractor(preprocess.to_uint8(recon))
  mse = np.mean(((images - recon) / 2) ** 2, axis=(1, 2, 3))
  expected = {
      "rfid_vs_shapes_eval": metric_reference.frechet_distance(real_pool, recon_pool),
      "is_of_reconstructions": metric_reference.inception_score(recon_probs),
      "codebook_usage": np.unique(np.asarray(indices)).size / tok.model.codebook_size,
      "psnr": float(np.mean(-10 * np.log10(mse))),
  }
  for key, value in expected.items():
    assert metrics[key]["value"] == pytest.approx(value, rel=1e-3), key
  assert results["inception"] == {"weights": weights, "resize": "bilinear"}
  assert glob.glob(os.path.join(out, "events.out.tfevents.*"))

  # The eval split against itself, featurized in two separate passes (the CLI's saved
  # statistics and one here): FID ~ 0.
  config = runs.read_run_config(tokenizer_dir, "vitvq")
  here = paper_metrics.reference_stats(config, extractor)
  assert here.num_images == 16 and here.description == "shapes_eval"
  saved = fid.FeatureStats.load(real_path)
  self_fid = fid.fid_from_stats(saved, here)
  print(
      f"\nFID(eval split, eval split) = {self_fid:.3g}; rFID = "
      f"{metrics['rfid_vs_shapes_eval']['value']:.4g}"
  )
  assert saved.num_images == 16 and self_fid < 1e-6
  proc = subprocess.run(
      [sys.executable, "-m", "vim_jax.evaluate", f"--fid_between={real_path},{real_path}"],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=run_files.cli_env(),
  )
  assert proc.returncode == 0 and "(shapes_eval [16 images], shapes_eval [16 images]) = 0" in (
      proc.stdout
  ), (proc.stdout + proc.stderr[-2000:])


def test_vim_step_evaluate_cli_with_and_without_rejection(
    vim_dir, classifier_dir, inception_files, tmp_path
):
  """The README's stage-2 evaluate command, read from README.md and run from the root of a
  scratch copy of the repository (relative workdirs; the reference statistics in ADM's file
  layout, mu and sigma only, here of the eval split's 16 images), with 12 samples instead of
  50,000; every value recomputed here from the same samples: FID against the reference, IS and
  class accuracy, with and without rejection."""
  root = readme_commands.scratch_repository(str(tmp_path))
  workdir = readme_commands.copy_run(vim_dir, root, "vim_large")
  readme_commands.copy_run(classifier_dir, root, "classifier")
  readme_commands.put_inception_weights(root, inception_files["flax"])
  trained = runs.load_vim(vim_dir)
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=16, mesh=_one_device())
  real_batches, _ = paper_metrics.eval_split_images(trained.config, 16)
  real_pool, _ = extractor(np.concatenate(list(real_batches)))
  real = np.asarray(real_pool, np.float64)
  np.savez(
      os.path.join(root, "VIRTUAL_imagenet256_labeled.npz"),
      mu=real.mean(0),
      sigma=np.cov(real, rowvar=False),
  )
  command = readme_commands.find("python -m vim_jax.evaluate --workdir=workdirs/vim_large")
  proc = subprocess.run(
      readme_commands.to_argv(
          command,
          {},
          edits=(("--num_samples=50000", "--num_samples=12"),),
          extra=("--batch_size=16",),
      ),
      cwd=root,
      capture_output=True,
      text=True,
      timeout=600,
      env=run_files.cli_env(),
  )  # one device, as a user's shell
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Closing _NonBlockingMetadataStore" not in proc.stderr  # the log filter
  (path,) = glob.glob(os.path.join(workdir, "eval", "results_*.json"))
  results = json.load(open(path))["metrics"]
  assert all(results[k]["num_images"] == 12 for k in results)
  fid_key = "fid_vs_VIRTUAL_imagenet256_labeled"
  assert fid_key in results, sorted(results)

  labels = generation.requested_labels(12, trained.model.num_classes, "")
  sampling = vim_step.sampling_config_from(trained.config)
  sampler = generation.Sampler(trained, sampling, 16, mesh=_one_device())
  samples = np.concatenate(list(sampler.batches(labels, 0)))
  classifier, cparams = runs.load_classifier(classifier_dir)
  kept, kept_labels = [], []  # in the order evaluate featurizes them: class by class
  for where, images, _ in generation.rejection_batches(
      sampler, labels, 0, classifier, cparams, 0.5
  ):
    kept.append(images)
    kept_labels.append(labels[where])
  for suffix, images, wanted in (
      ("", samples, labels),
      ("_rejection0.5", np.concatenate(kept), np.concatenate(kept_labels)),
  ):
    pool, probs = extractor(images)
    accuracy = np.mean(
        np.argmax(generation.class_probabilities(classifier, cparams, images), -1) == wanted
    )
    expected = {
        fid_key: metric_reference.frechet_distance(real_pool, pool),
        "is_of_samples": metric_reference.inception_score(probs),
        "class_accuracy": accuracy,
    }
    for key, value in expected.items():
      assert results[key + suffix]["value"] == pytest.approx(value, rel=1e-3, abs=1e-9), (
          key + suffix
      )


def test_results_files_and_reference_labels(vim_dir, inception_files, tmp_path):
  trained = runs.load_vim(vim_dir)
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=16)
  reference = paper_metrics.reference_stats(trained.config, extractor, max_images=16)
  results = {"fid_vs_shapes_eval": paper_metrics.metric(1.5, 12, "shapes_eval")}
  # The JSON and TensorBoard writer.
  path = paper_metrics.write_results(str(tmp_path), 3, results, {"workdir": vim_dir})
  assert json.load(open(path))["metrics"]["fid_vs_shapes_eval"] == {
      "value": 1.5,
      "num_images": 12,
      "against": "shapes_eval",
  }
  # A statistics file names the reference in the metric names.
  stats_path = str(tmp_path / "ref.npz")
  reference.save(stats_path)
  loaded = paper_metrics.reference_stats(trained.config, extractor, stats_path)
  assert paper_metrics.reference_label_for(stats_path, trained.config, loaded) == "shapes_eval"


def test_trainers_compute_fid_periodically(tiny_config, tokenizer_dir, inception_files, tmp_path):
  """The in-training values equal a recomputation from the final params: stage 1 through the
  evaluator the CLI test checks; stage 2 (greedy sampling, so 1 device and 8 draw the same
  tokens) from the trainer's sampling convention and tests/metric_reference.py."""
  tiny_config.loss.adversarial = 0.0
  tiny_config.update(total_steps=2, eval_every=100, checkpoint_every=100, num_eval_images=16)
  tiny_config.fid.update(every=2, inception_weights=inception_files["flax"], batch_size=16)
  result = tokenizer_trainer.train_and_evaluate(
      tiny_config, str(tmp_path / "tok"), devices=jax.devices()[:1]
  )
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=16)
  expected, _ = paper_metrics.evaluate_tokenizer(
      runs.load_tokenizer(str(tmp_path / "tok")), extractor
  )
  for key in ("rfid_vs_shapes_eval", "is_of_reconstructions", "psnr"):
    assert result.eval_metrics[key] == pytest.approx(expected[key]["value"], rel=1e-4), key

  from vim_jax.data import preprocess

  config = tiny_vim_config(tokenizer_dir, steps=2)
  config.sampling.temperature = 0.0
  config.fid.update(
      every=2, num_images=10, inception_weights=inception_files["flax"], batch_size=16
  )
  result = vim_trainer.train_and_evaluate(config, str(tmp_path / "vim"), devices=jax.devices()[:1])
  trained = runs.load_vim(str(tmp_path / "vim"))
  sample = jax.jit(
      vim_step.make_sample_fn(
          trained.model, trained.tokenizer.model, vim_step.sampling_config_from(config)
      )
  )
  labels = np.resize(np.arange(6, dtype=np.int32), 16)  # class-balanced, padded to the batch
  images = preprocess.to_uint8(
      np.asarray(sample(trained.params, trained.tokenizer.params, labels, jax.random.key(0)))
  )[:10]
  pool, probs = extractor(images)
  real_batches, total = paper_metrics.eval_split_images(config)
  real = np.concatenate(list(real_batches))
  assert len(real) == total == 32
  real_pool = np.concatenate([extractor(real[i : i + 16])[0] for i in range(0, total, 16)])
  assert result.eval_metrics["fid_vs_shapes_eval"] == pytest.approx(
      metric_reference.frechet_distance(real_pool, pool), rel=1e-3
  )
  assert result.eval_metrics["is_of_samples"] == pytest.approx(
      metric_reference.inception_score(probs), rel=1e-3
  )


def test_missing_inception_weights_stop_the_run_at_start(tiny_config, tmp_path):
  tiny_config.fid.update(every=2, inception_weights=str(tmp_path / "missing.msgpack"))
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    tokenizer_trainer.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*"))


def test_evaluate_names_what_it_compares_against():
  from configs import vitvq_base

  config = vitvq_base.get_config()
  assert paper_metrics.data_label(config.data) == "imagenet2012_validation"
  config.data.update(source="tokens")
  with pytest.raises(ValueError, match="--reference_stats"):
    paper_metrics.data_label(config.data)
  # N(0, I) against N(1, I) in 2-D: only the means differ, ||0 - 1||^2 = 2.
  assert fid.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)) == pytest.approx(2.0)


def test_gfid_of_an_imagenet_run_warns_without_the_papers_reference(caplog, tmp_path):
  """Without reference statistics, an ImageNet VIM's gFID is against its own eval split; the
  warning says so and how to get ADM's reference batch. Other data and given files: silent."""
  from configs import vim_base
  from vim_jax.data import sources

  config = vim_base.get_config()
  config.data.data_dir = str(tmp_path / "tfds")  # nothing prepared there
  warning = paper_metrics.not_the_papers_protocol(config, "")
  for part in (
      "imagenet2012_validation",
      "50,000 samples",
      "VIRTUAL_imagenet256_labeled.npz",
      "--reference_stats",
      paper_metrics.ADM_IMAGENET256_REFERENCE,
  ):
    assert part in warning
  assert paper_metrics.not_the_papers_protocol(config, "ref.npz") is None
  with caplog.at_level(logging.WARNING), pytest.raises(sources.DatasetNotPreparedError):
    paper_metrics.reference_stats(config, extractor=None)
  assert warning in caplog.text
  shapes = vim_base.get_config("tiny")
  assert shapes.data.source == "shapes"
  assert paper_metrics.not_the_papers_protocol(shapes, "") is None
