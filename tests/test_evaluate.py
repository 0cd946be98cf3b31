"""`python -m vim_jax.evaluate` and the trainers' periodic FID, with random-weight Inception."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_vim_config
from vim_jax import fid, reported_metrics, runs, token_sampling, train_vim, train_vitvq

pytest.importorskip("torch")  # the random-weight Inception files are written with torch

STAGE1_METRICS = ("rfid_vs_shapes_eval", "is_of_reconstructions", "is_of_reconstructions_std",
                  "psnr", "ssim", "l1", "l2", "codebook_usage", "codebook_usage_per_256",
                  "perplexity")


def test_stage1_evaluate_cli_writes_every_metric(tokenizer_dir, inception_files, tmp_path):
  out = str(tmp_path / "eval")
  real_path = str(tmp_path / "shapes_eval_stats.npz")
  cmd = [sys.executable, "-m", "vim_jax.evaluate", f"--workdir={tokenizer_dir}",
         f"--inception_weights={inception_files['flax']}", f"--out={out}", "--batch_size=16",
         f"--save_reference_stats={real_path}"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "rfid_vs_shapes_eval" in proc.stdout
  (path,) = glob.glob(os.path.join(out, "results_*.json"))
  results = json.load(open(path))
  metrics = results["metrics"]
  assert set(STAGE1_METRICS) <= set(metrics)
  assert all(m["num_images"] == 16 for m in metrics.values())
  assert metrics["rfid_vs_shapes_eval"]["against"] == "shapes_eval (16 images)"
  assert metrics["rfid_vs_shapes_eval"]["value"] > 0  # a 4-step tokenizer is far from exact
  assert metrics["is_of_reconstructions"]["value"] >= 1.0
  assert results["inception"] == {"weights": inception_files["flax"], "resize": "bilinear"}
  assert glob.glob(os.path.join(out, "events.out.tfevents.*"))

  # The eval split against itself, featurized in two separate passes: FID ~ 0.
  config = runs.read_run_config(tokenizer_dir, "vitvq")
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=16)
  first = reported_metrics.reference_stats(config, extractor)
  second = reported_metrics.reference_stats(config, extractor)
  assert first.num_images == 16 and first.description == "shapes_eval"
  self_fid = fid.fid_from_stats(first, second)
  print(f"\nFID(eval split, eval split) = {self_fid:.3g}; rFID = "
        f"{metrics['rfid_vs_shapes_eval']['value']:.4g}")
  assert self_fid < 1e-6
  saved = fid.FeatureStats.load(real_path)
  assert saved.num_images == 16 and fid.fid_from_stats(saved, first) < 1e-6
  proc = subprocess.run([sys.executable, "-m", "vim_jax.evaluate",
                         f"--fid_between={real_path},{real_path}"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "(shapes_eval [16 images], shapes_eval [16 images]) = 0" in (
      proc.stdout), proc.stdout + proc.stderr[-2000:]


def test_stage2_evaluate_with_and_without_rejection(vim_dir, classifier_dir, inception_files,
                                                    tmp_path):
  trained = runs.load_vim(vim_dir)
  extractor = fid.FeatureExtractor(inception_files["flax"], batch_size=16)
  reference = reported_metrics.reference_stats(trained.config, extractor, max_images=16)
  results = reported_metrics.evaluate_generator(
      trained, extractor, reference, "shapes_eval", num_samples=12, seed=0,
      sampling_config=token_sampling.SamplingConfig(), batch_size=16,
      classifier_workdir=classifier_dir, acceptance=0.5)
  for suffix in ("", "_rejection0.5"):
    assert results[f"fid_vs_shapes_eval{suffix}"]["value"] > 0
    assert results[f"fid_vs_shapes_eval{suffix}"]["against"] == "shapes_eval (16 images)"
    assert results[f"is_of_samples{suffix}"]["value"] >= 1.0
    assert 0 <= results[f"class_accuracy{suffix}"]["value"] <= 1
    assert all(results[k]["num_images"] == 12 for k in results)
  # The JSON and TensorBoard writer.
  path = reported_metrics.write_results(str(tmp_path), 3, results, {"workdir": vim_dir})
  assert json.load(open(path))["metrics"]["fid_vs_shapes_eval"]["num_images"] == 12
  # A statistics file names the reference in the metric names.
  stats_path = str(tmp_path / "ref.npz")
  reference.save(stats_path)
  loaded = reported_metrics.reference_stats(trained.config, extractor, stats_path)
  assert reported_metrics.reference_label_for(stats_path, trained.config, loaded) == "shapes_eval"


def test_trainers_compute_fid_periodically(tiny_config, tokenizer_dir, inception_files,
                                           tmp_path):
  tiny_config.loss.adversarial = 0.0
  tiny_config.update(total_steps=2, eval_every=100, checkpoint_every=100, num_eval_images=16)
  tiny_config.fid.update(every=2, inception_weights=inception_files["flax"], batch_size=16)
  result = train_vitvq.train_and_evaluate(tiny_config, str(tmp_path / "tok"))
  assert result.eval_metrics["rfid_vs_shapes_eval"] > 0
  assert result.eval_metrics["is_of_reconstructions"] >= 1.0

  config = tiny_vim_config(tokenizer_dir, steps=2)
  config.fid.update(every=2, num_images=10, inception_weights=inception_files["flax"],
                    batch_size=16)
  result = train_vim.train_and_evaluate(config, str(tmp_path / "vim"))
  assert result.eval_metrics["fid_vs_shapes_eval"] > 0
  assert result.eval_metrics["is_of_samples"] >= 1.0


def test_missing_inception_weights_stop_the_run_at_start(tiny_config, tmp_path):
  tiny_config.fid.update(every=2, inception_weights=str(tmp_path / "missing.msgpack"))
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    train_vitvq.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*"))


def test_evaluate_names_what_it_compares_against():
  from configs import vitvq_base
  config = vitvq_base.get_config()
  assert reported_metrics.data_label(config.data) == "imagenet2012_validation"
  config.data.update(source="tokens")
  with pytest.raises(ValueError, match="--reference_stats"):
    reported_metrics.data_label(config.data)
  assert np.isfinite(fid.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)))
