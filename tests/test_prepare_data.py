"""ImageNet's path from the published archives to a trained and evaluated run.

`fake_imagenet` (conftest.py) writes ILSVRC2012_img_train.tar (per-synset tars, with the real
names of one CMYK JPEG and of the PNG saved as .JPEG) and ILSVRC2012_img_val.tar (official
validation names), and prepares them with `python -m vim_jax.tools.prepare_data`. tfds' own
imagenet2012 builder does the work, unmocked: it accepts small archives as they are, so nothing
had to be built around it.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import readme_commands
import run_files
import tensorflow_datasets as tfds
from conftest import REPO_ROOT

from vim_jax.data import pipeline, sources
from vim_jax.tools import prepare_data


def _imagenet_list(name):
  return tfds.core.tfds_path(f"datasets/imagenet2012/{name}").read_text().split()


def test_prepared_archives_read_back_with_the_right_labels_and_colours(fake_imagenet):
  assert "imagenet2012 5.1.0" in fake_imagenet["stdout"] and "is ready" in fake_imagenet["stdout"]
  archive, data_dir = fake_imagenet["archive"], fake_imagenet["data_dir"]
  synsets = _imagenet_list("labels.txt")
  train = sources.TfdsSource("imagenet2012", "train", data_dir)
  assert train.num_classes == 1000 and len(train) == archive["train"]
  for i in range(len(train)):
    example = train.data[i]
    name = example["file_name"]
    name = name.decode() if isinstance(name, bytes) else name
    assert example["label"] == synsets.index(archive["train_files"][name]), name
    if name in archive["repaired"]:
      # The builder re-encodes the CMYK and PNG files as RGB JPEG: colours kept, not inverted.
      original = archive["repaired"][name].astype(np.float64)
      image = train[i]["image"].astype(np.float64)
      assert image.shape == original.shape
      assert np.abs(image - original).mean() < 15, name
      assert np.abs(255 - image - original).mean() > 50, name
  # Validation labels come from tfds' list, in the sorted order of the official file names.
  val = sources.TfdsSource("imagenet2012", "validation", data_dir)
  expected = [synsets.index(s) for s in _imagenet_list("validation_labels.txt")[: len(val)]]
  by_name = sorted((val.data[i]["file_name"], val[i]["label"]) for i in range(len(val)))
  assert [label for _, label in by_name] == expected and len(val) == archive["validation"]
  # Batches are a pure function of (seed, step): the resume guarantee.
  batch = pipeline.InputPipeline(train, 8, 16, seed=0, train=True).local_batch(3)
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
  again = pipeline.InputPipeline(train, 8, 16, seed=0, train=True).local_batch(3)
  np.testing.assert_array_equal(batch["image"], again["image"])
  np.testing.assert_array_equal(batch["label"], again["label"])


def test_rerun_says_ready_and_a_rerun_after_an_interruption_finishes(
    fake_imagenet, tmp_path, capsys
):
  prepare_data.prepare("imagenet2012", fake_imagenet["data_dir"], fake_imagenet["manual_dir"])
  assert "is ready (array_record; train 26, validation 8). Nothing to do." in (
      capsys.readouterr().out
  )
  # An interrupted run leaves tfds' incomplete.* folder; the rerun removes it and finishes.
  data_dir = tmp_path / "tfds"
  leftover = data_dir / "imagenet2012" / "incomplete.ABC123_5.1.0"
  leftover.mkdir(parents=True)
  (leftover / "imagenet2012-train.array_record-00000-of-00001").write_bytes(b"half")
  prepare_data.prepare("imagenet2012", str(data_dir), fake_imagenet["manual_dir"])
  out = capsys.readouterr().out
  assert f"removing what an interrupted earlier run left: {leftover}" in out
  assert not leftover.exists()
  assert len(sources.TfdsSource("imagenet2012", "validation", str(data_dir))) == 8


def test_empty_manual_dir_names_each_missing_file_and_where_to_get_it(tmp_path):
  data_dir = tmp_path / "tfds"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.tools.prepare_data",
          "--name=imagenet2012",
          f"--data_dir={data_dir}",
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  manual = data_dir / "downloads" / "manual"
  for name, size in (
      ("ILSVRC2012_img_train.tar", "147.9 GB"),
      ("ILSVRC2012_img_val.tar", "6.7 GB"),
  ):
    assert f"missing {name} ({size}): expected at {manual / name}" in proc.stderr
  assert proc.stderr.count("get it from https://image-net.org/download-images") == 2
  assert "ILSVRC2012_img_test.tar: not there (optional" in proc.stdout
  assert not (data_dir / "imagenet2012" / "5.1.0" / "dataset_info.json").exists()


def test_broken_archives_are_refused_before_any_work(fake_imagenet, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(fake_imagenet["manual_dir"], manual)
  val = manual / "ILSVRC2012_img_val.tar"
  # Truncated in the middle of the archive, as an interrupted download leaves it.
  val.write_bytes(val.read_bytes()[: val.stat().st_size // 2])
  with pytest.raises(prepare_data.ManualFileError, match="is not a complete tar archive"):
    prepare_data.check_manual_files("imagenet2012", str(manual), None)
  # A gap in the validation numbers would shift every later label: refused.
  with tarfile.open(val, "w") as tar:
    for number in (1, 2, 4):
      info = tarfile.TarInfo(f"ILSVRC2012_val_{number:08d}.JPEG")
      tar.addfile(info)
  with pytest.raises(prepare_data.ManualFileError, match="numbers are not 1..3"):
    prepare_data.check_manual_files("imagenet2012", str(manual), None)
  # A train archive of loose JPEGs is not the per-synset layout.
  train = manual / "ILSVRC2012_img_train.tar"
  with tarfile.open(train, "w") as tar:
    tar.addfile(tarfile.TarInfo("n01440764_1.JPEG"))
  with pytest.raises(prepare_data.ManualFileError, match="one <synset>.tar per ImageNet class"):
    prepare_data.check_manual_files("imagenet2012", str(manual), None)


def test_unprepared_or_tfrecord_dataset_stops_with_the_prepare_command(fake_imagenet, tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(sources.DatasetNotPreparedError) as error:
    sources.TfdsSource("imagenet2012", "train", data_dir)
  message = str(error.value)
  assert "'imagenet2012' is not prepared in data_dir=" + repr(data_dir) in message
  assert f"python -m vim_jax.tools.prepare_data --name=imagenet2012 --data_dir={data_dir}" in (
      message
  )
  assert not os.path.exists(os.path.join(data_dir, "downloads"))  # nothing was downloaded
  # Prepared as tfrecord (e.g. by an old `tfds build`): random access cannot read it.
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(
      file_format="tfrecord",
      download_config=tfds.download.DownloadConfig(manual_dir=fake_imagenet["manual_dir"]),
  )
  with pytest.raises(sources.DatasetNotPreparedError, match="--overwrite"):
    sources.TfdsSource("imagenet2012", "train", data_dir)
  with pytest.raises(sources.DatasetNotPreparedError, match=r"no split 'test'; it has"):
    sources.TfdsSource("imagenet2012", "test", fake_imagenet["data_dir"])
  with pytest.raises(SystemExit, match="Rerun with --overwrite"):
    prepare_data.prepare("imagenet2012", data_dir, fake_imagenet["manual_dir"])


def test_train_and_evaluate_on_the_prepared_archives(fake_imagenet, inception_files, tmp_path):
  """The README's ImageNet step 4 at tiny size, read from README.md and run from the root of
  the repository copy that holds the prepared data, with its relative $WORKDIR and
  $TFDS_DATA_DIR; then vim_jax.evaluate on the run, from elsewhere, after the data moved."""
  root = fake_imagenet["root"]
  variables = {"WORKDIR": "run", "TFDS_DATA_DIR": "tfds"}
  env = {**run_files.cli_env(), **variables}  # one CPU device, as a user's shell has
  command = readme_commands.find("--workdir=$WORKDIR --config.data.data_dir=$TFDS_DATA_DIR")
  train = subprocess.run(
      readme_commands.to_argv(
          command,
          variables,
          edits=(("configs/vitvq_base.py", "configs/vitvq_base.py:tiny"),),
          extra=(
              "--config.data.source=tfds",
              "--config.data.name=imagenet2012",
              "--config.total_steps=10",
              "--config.eval_every=10",
              "--config.checkpoint_every=10",
          ),
      ),
      cwd=root,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  workdir = os.path.join(root, "run")
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["data"]["data_dir"] == os.path.join(root, "tfds")  # recorded absolute
  # From the run's TensorBoard scalars, not its log: the eval line is written by a background
  # thread and a C++ log line can land inside it.
  trained_psnr = run_files.event_scalars(workdir)["eval/psnr"][10]
  # The data moves after training (another disk, another bucket): evaluate reads it where
  # --data_dir says, not where config.json recorded it.
  moved = str(tmp_path / "moved_tfds")
  shutil.move(os.path.join(root, "tfds"), moved)
  out = str(tmp_path / "eval")
  evaluate = subprocess.run(
      [
          sys.executable,
          "-m",
          "vim_jax.evaluate",
          f"--workdir={workdir}",
          f"--out={out}",
          f"--inception_weights={inception_files['flax']}",
          "--batch_size=8",
          f"--data_dir={moved}",
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  shutil.move(moved, os.path.join(root, "tfds"))  # fake_imagenet is shared by the module
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  metrics = json.load(open(os.path.join(out, "results_00000010.json")))["metrics"]
  print(f"\ntiny run on the fake ImageNet: eval PSNR {metrics['psnr']['value']:.3f} dB")
  # The evaluate command scores the same 8 validation images with the same params.
  assert metrics["psnr"]["num_images"] == 8
  assert metrics["psnr"]["value"] == pytest.approx(trained_psnr, abs=1e-3)
  assert metrics["rfid_vs_imagenet2012_validation"]["against"] == (
      "imagenet2012_validation (8 images)"
  )


def test_a_run_records_the_tfds_data_dir_it_reads(tmp_path, monkeypatch):
  """The launch scripts give the data's location as $TFDS_DATA_DIR, not in the config: the run's
  config records it (absolute) so that evaluate and the notebook, started later without the
  variable, find the data; a data_dir the config sets, or a source other than tfds, stays."""
  from configs import vitvq_base
  from vim_jax import main
  from vim_jax.data import sources

  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("TFDS_DATA_DIR", "tfds")
  config = vitvq_base.get_config()
  assert config.data.source == "tfds" and config.data.data_dir == ""
  assert sources.with_recorded_data_dir(config).data.data_dir == str(tmp_path / "tfds")
  monkeypatch.setenv("TFDS_DATA_DIR", "gs://bucket/tensorflow_datasets")
  config.data.data_dir = ""
  assert sources.with_recorded_data_dir(config).data.data_dir == ("gs://bucket/tensorflow_datasets")
  monkeypatch.delenv("TFDS_DATA_DIR")
  config.data.data_dir = ""
  assert sources.with_recorded_data_dir(config).data.data_dir == os.path.expanduser(
      "~/tensorflow_datasets"
  )
  config.data.data_dir = "/data/tfds"
  assert sources.with_recorded_data_dir(config).data.data_dir == "/data/tfds"
  shapes = vitvq_base.get_config("tiny")
  assert sources.with_recorded_data_dir(shapes).data.data_dir == ""
  import inspect  # main's one resolution step applies it to every run

  assert "sources.with_recorded_data_dir(" in inspect.getsource(main.main)
