"""Input pipeline: image folders with bad files, the embedded data (tfds: test_prepare_data.py)."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import vim_ffhq, vitvq_ffhq
from vim_jax.data import pipeline, preprocess, shapes, sources


def _check_batch(batch, b, size):
  assert batch["image"].shape == (b, size, size, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (b,) and batch["label"].dtype == np.int32


def _write_folder(root):
  rng = np.random.default_rng(0)
  os.makedirs(root / "cats")
  os.makedirs(root / "dogs" / "nested")
  Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "cats" / "rgb.png")
  Image.fromarray(np.full((24, 24), 77, np.uint8), mode="L").save(root / "cats" / "gray.jpg")
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 255  # red, fully transparent -> composited over white
  Image.fromarray(rgba, mode="RGBA").save(root / "dogs" / "alpha.png")
  Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)).convert("P").save(
      root / "dogs" / "nested" / "palette.PNG"
  )
  (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  (root / "cats" / "notes.txt").write_text("ignored")


def test_folder_source_converts_modes_and_skips_corrupt_files(tmp_path):
  _write_folder(tmp_path)
  source = sources.FolderSource(str(tmp_path), "train", eval_fraction=0.0)
  assert len(source) == 5 and source.num_classes == 2
  assert source.class_names == ["cats", "dogs"]
  by_name = {os.path.basename(f): i for i, f in enumerate(source.files)}
  gray = source[by_name["gray.jpg"]]["image"]
  assert gray.shape == (24, 24, 3) and np.all(gray == gray[..., :1])
  alpha = source[by_name["alpha.png"]]["image"]
  np.testing.assert_array_equal(alpha[0, 0], [255, 255, 255])
  assert source[by_name["palette.PNG"]]["image"].shape == (18, 18, 3)
  assert source[by_name["palette.PNG"]]["label"] == 1
  with pytest.raises(sources.CorruptImageError, match="broken.jpg"):
    source[by_name["broken.jpg"]]

  pipe = pipeline.InputPipeline(source, global_batch_size=5, image_size=16, seed=0, train=False)
  batches = list(pipe.iterate())
  assert len(batches) == 1
  _check_batch(batches[0], 5, 16)
  assert pipe.skipped_images == 1  # the corrupt file was replaced by the next readable one
  # num_workers=0 (the default): one decoding thread per core this process may use.
  assert pipe.num_workers == len(os.sched_getaffinity(0))
  assert pipeline.InputPipeline(source, 5, 16, seed=0, train=False, num_workers=3).num_workers == 3


def test_unreadable_files_are_counted_and_reported_once_over_many_epochs(tmp_path, caplog):
  """3 broken files among 12, 30 training steps of 4 (10 epochs): data/skipped_images is 3
  and each file is warned about once (the former pipeline counted every read: 60 here)."""
  import logging

  rng = np.random.default_rng(1)
  os.makedirs(tmp_path / "a")
  for i in range(9):
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
        tmp_path / "a" / f"good{i}.png"
    )
  for i in range(3):
    (tmp_path / "a" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  source = sources.FolderSource(str(tmp_path), "train", eval_fraction=0.0)
  pipe = pipeline.InputPipeline(
      source, global_batch_size=4, image_size=8, seed=0, train=True, num_workers=2
  )
  with caplog.at_level(logging.WARNING, logger="vim_jax.data.pipeline"):
    batches = list(pipe.iterate(num_steps=30))
  assert len(batches) == 30 and pipe.skipped_images == 3
  warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warnings) == 3
  assert sorted(w.split("broken")[1][0] for w in warnings) == ["0", "1", "2"]
  # A broken file is still replaced by the next readable one: batches never change with the
  # count kept (the same pipeline, rebuilt, gives the same first batch).
  again = pipeline.InputPipeline(source, global_batch_size=4, image_size=8, seed=0, train=True)
  np.testing.assert_array_equal(next(again.iterate(num_steps=1))["image"], batches[0]["image"])


def test_folder_source_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.folder"):
    sources.FolderSource(str(tmp_path / "missing"), "train")
  with pytest.raises(ValueError, match="no .jpg"):
    sources.FolderSource(str(tmp_path), "train")


def test_folder_eval_split_is_disjoint_and_deterministic(tmp_path):
  for i in range(40):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i:03d}.png")
  train = sources.FolderSource(str(tmp_path), "train", eval_fraction=0.25)
  evaluation = sources.FolderSource(str(tmp_path), "eval", eval_fraction=0.25)
  assert not set(train.files) & set(evaluation.files)
  assert len(train) + len(evaluation) == 40 and len(evaluation) > 0
  assert sources.FolderSource(str(tmp_path), "eval", eval_fraction=0.25).files == evaluation.files


def test_folder_eval_list_names_the_eval_files(tmp_path):
  """taming-transformers' split files (ffhqvalidation.txt: bare file names) and paths relative
  to the folder both select eval files; the rest is train, and a name the folder lacks stops
  the run naming the list."""
  for sub in ("00000", "01000"):
    (tmp_path / "images" / sub).mkdir(parents=True)
    for i in range(5):
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(
          tmp_path / "images" / sub / f"{sub[:2]}{i:03d}.png"
      )
  listing = tmp_path / "validation.txt"
  listing.write_text("01003.png\n01004.png\n\n00000/00004.png\n")
  folder = str(tmp_path / "images")
  evaluation = sources.FolderSource(folder, "eval", eval_list=str(listing))
  train = sources.FolderSource(folder, "train", eval_list=str(listing))
  assert sorted(os.path.basename(f) for f in evaluation.files) == [
      "00004.png",
      "01003.png",
      "01004.png",
  ]
  assert len(train) == 7 and not set(train.files) & set(evaluation.files)
  listing.write_text("01003.png\n99999.png\n")
  with pytest.raises(ValueError, match="folder_eval_list=.*names 1 of its 2 files.*'99999.png'"):
    sources.FolderSource(folder, "train", eval_list=str(listing))
  with pytest.raises(FileNotFoundError, match="folder_eval_list"):
    sources.FolderSource(folder, "train", eval_list=str(tmp_path / "missing.txt"))
  # The FFHQ configs hold out nothing by path hash (folder_eval_fraction 0): without the list
  # the run stops at start instead of evaluating on a split the paper's numbers do not use.
  with pytest.raises(ValueError, match="folder_eval_fraction=0 .*folder_eval_list.*empty"):
    sources.FolderSource(folder, "eval", eval_fraction=0.0)
  for module in (vitvq_ffhq, vim_ffhq):
    assert module.get_config().data.folder_eval_fraction == 0.0


def test_shapes_are_deterministic_and_labelled():
  a, la = shapes.render_example(7, "train", 11, 48)
  b, lb = shapes.render_example(7, "train", 11, 48)
  np.testing.assert_array_equal(a, b)
  assert la == lb == 11 % len(shapes.CLASS_NAMES)
  assert a.shape == (48, 48, 3) and a.dtype == np.uint8
  assert not np.array_equal(a, shapes.render_example(7, "eval", 11, 48)[0])
  assert not np.array_equal(a, shapes.render_example(8, "train", 11, 48)[0])
  big, _ = shapes.render_example(7, "train", 11, 256)  # any resolution
  assert big.shape == (256, 256, 3)


def test_shapes_classes_differ_in_pixels():
  """The shape (not just colour) is visible: the foreground masks of classes differ."""
  masks = {}
  for label in range(len(shapes.CLASS_NAMES)):
    x = np.linspace(-0.5, 0.5, 64)
    yy, xx = np.meshgrid(x, x, indexing="ij")
    masks[label] = shapes._shape_sdf(shapes.CLASS_NAMES[label], xx, yy, 0.3) < 0
  for i in masks:
    for j in masks:
      if i < j:
        assert np.mean(masks[i] != masks[j]) > 0.02, (shapes.CLASS_NAMES[i], shapes.CLASS_NAMES[j])


def test_train_batches_are_a_function_of_step_and_split_over_processes():
  source = sources.ShapesSource("train", 40, 16, seed=3)
  whole = pipeline.InputPipeline(source, 8, 16, seed=5, train=True)
  parts = [
      pipeline.InputPipeline(source, 8, 16, seed=5, train=True, rows=np.arange(4) + 4 * p)
      for p in range(2)
  ]
  for step in (0, 4, 7):  # step 5 crosses into the second epoch (40 examples / 8)
    full = whole.local_batch(step)
    halves = [p.local_batch(step) for p in parts]
    np.testing.assert_array_equal(full["image"], np.concatenate([h["image"] for h in halves]))
  # One epoch visits every example exactly once.
  seen = np.concatenate([whole._global_indices(s)[0] for s in range(5)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(40))
  # Iteration from a later step yields the same batches as direct access (resume).
  it = whole.iterate(start_step=3, num_steps=2)
  np.testing.assert_array_equal(next(it)["image"], whole.local_batch(3)["image"])
  np.testing.assert_array_equal(next(it)["image"], whole.local_batch(4)["image"])


def test_eval_pass_pads_last_batch_with_mask():
  source = sources.ShapesSource("eval", 10, 16, seed=3)
  pipe = pipeline.InputPipeline(source, 4, 16, seed=0, train=False)
  batches = list(pipe.iterate())
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  first = np.concatenate([b["image"] for b in batches])[:10]
  expected = np.stack(
      [preprocess.preprocess_image(source[i]["image"], 16, None, False) for i in range(10)]
  )
  np.testing.assert_array_equal(first, expected)


def test_preprocess_resizes_crops_and_scales():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 40:] = 255
  out = preprocess.preprocess_image(image, 20, None, random_flip=False)
  assert out.shape == (20, 20, 3)
  # Centre crop of the resized 20x40 image covers columns 10..30: left half black, right white.
  assert out.dtype == np.uint8 and out[:, :8].max() == 0 and out[:, 12:].min() == 255
  scaled = preprocess.from_uint8(out)  # what the devices compute from it
  assert scaled.dtype == np.float32 and scaled[:, :8].max() == -1.0 and scaled[:, 12:].min() == 1.0
  np.testing.assert_array_equal(preprocess.to_uint8(scaled), out)  # and back, exactly


class _ListSource:
  """A source over given uint8 images, label = index."""

  num_classes = 2

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": i}


def _find_crop(out, images):
  """(image index, top, left, flipped) of the crop `out` (mirrored left-right when flipped) of
  one of `images`, found by comparing with every slice; None when it is no such crop."""
  size = out.shape[0]
  for index, image in enumerate(images):
    h, w = image.shape[:2]
    for flipped in (False, True):
      unflipped = out[:, ::-1] if flipped else out
      for top in range(h - size + 1):
        for left in range(w - size + 1):
          if np.array_equal(unflipped, image[top : top + size, left : left + size]):
            return index, top, left, flipped
  return None


def test_training_batches_are_random_crops_and_mirror_images():
  """Every training image is a slice of its source image at some offset, mirrored left-right
  or not; over 80 draws with a fixed seed the offsets vary along the long side (vertical for
  a tall image, horizontal for a wide one) and both flip outcomes occur, near half each. Eval
  batches are the centre crop, never mirrored; random_flip=False never mirrors. (Images whose
  shorter side is the image size, so no resizing is involved.)"""
  rng = np.random.default_rng(0)
  images = [
      rng.integers(0, 256, (12, 19, 3), dtype=np.uint8),  # wide
      rng.integers(0, 256, (19, 12, 3), dtype=np.uint8),
  ]  # tall
  source = _ListSource(images)
  found = []
  pipe = pipeline.InputPipeline(source, 8, 12, seed=0, train=True, num_workers=1)
  for step in range(10):
    batch = pipe.local_batch(step)
    for out, label in zip(batch["image"], batch["label"]):
      match = _find_crop(out, images)
      assert match is not None and match[0] == label, (step, match, label)
      found.append(match)
  wide = {left for index, top, left, _ in found if index == 0}
  tall = {top for index, top, left, _ in found if index == 1}
  assert {top for index, top, _, _ in found if index == 0} == {0} and len(wide) >= 5, wide
  assert {left for index, _, left, _ in found if index == 1} == {0} and len(tall) >= 5, tall
  flips = sum(f for *_, f in found)
  assert 0.3 < flips / len(found) < 0.7, flips
  no_flip = pipeline.InputPipeline(
      source, 8, 12, seed=0, train=True, random_flip=False, num_workers=1
  )
  assert not any(_find_crop(out, images)[3] for out in no_flip.local_batch(0)["image"])
  eval_pipe = pipeline.InputPipeline(source, 2, 12, seed=0, train=False, num_workers=1)
  eval_batch = next(eval_pipe.iterate())["image"]
  assert [_find_crop(out, images) for out in eval_batch] == [(0, 0, 3, False), (1, 3, 0, False)]


def test_simple_style_uses_the_palette_and_solid_backgrounds():
  style = shapes.ShapesStyle(num_colors=4, gradient=False, min_radius=0.2, max_radius=0.3)
  palette = np.round(shapes.PALETTE[:4] * 255).astype(np.uint8)
  for i in range(12):
    image, _ = shapes.render_example(0, "train", i, 32, style=style)
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners == corners[0])  # solid background
    assert any(np.array_equal(corners[0], p) for p in palette)
    # Every fully covered pixel has a palette colour (only the 1-pixel edge is blended).
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert sum(any(np.array_equal(np.array(c), p) for p in palette) for c in colours) >= 2
  with pytest.raises(ValueError, match="num_colors=1"):
    shapes.render_example(0, "train", 0, 32, style=shapes.ShapesStyle(num_colors=1))


def test_images_cross_as_uint8_and_are_scaled_on_the_device():
  """The pipeline's uint8 batches become float32 in [-1, 1] on the devices, sharded over the
  batch axes like any batch (a quarter of float32's host-to-device bytes)."""
  from vim_jax.infra import parallel

  mesh = parallel.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  images[0, 0, 0] = [0, 128, 255]
  batch = parallel.global_batch_from_local(
      {"image": images, "label": np.arange(8, dtype=np.int32)}, mesh, 8
  )
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert batch["image"].sharding == parallel.batch_sharding(mesh)
  on_device = np.asarray(batch["image"])
  np.testing.assert_array_equal(on_device, preprocess.from_uint8(images))  # the host's bits
  np.testing.assert_allclose(
      on_device, images.astype(np.float64) / 127.5 - 1.0, rtol=0, atol=7.5e-8
  )
  assert on_device[0, 0, 0, 0] == -1.0 and on_device[0, 0, 0, 2] == 1.0
