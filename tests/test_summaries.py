"""vim_jax.infra.summaries: our TensorBoard event files, checked with readers we did not write.

- TensorBoard's own loader (plugin_event_accumulator, what `tensorboard --logdir` runs) and
  TensorFlow's summary_iterator read back the same tags, steps and values; images decode to
  the exact pixels written; histogram counts add up.
- The same writes made with clu's tf.summary writer give the same metadata and tensors.
- The TFRecord framing is byte-for-byte tf.io.TFRecordWriter's.
- Each flush is one complete file; file names sort in write order; nothing pending, no file.
- A gs:// logdir goes through vim_jax.infra.fileio (the object_store fixture of test_fileio.py).
"""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.compat.proto import summary_pb2
from tensorboard.util import tensor_util
from test_fileio import object_store  # noqa: F401 (a fixture)

from vim_jax.infra import summaries

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)  # [N, H, W, C]
GRAY = RNG.integers(0, 256, (4, 6, 1), dtype=np.uint8)  # [H, W, 1]
VALUES = RNG.standard_normal(1000)


def _files(folder):
  return sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))


def _tf_events(path):
  return list(tf.compat.v1.train.summary_iterator(path))


def _tensorboard(folder):
  """TensorBoard's loader over the run folder, keeping every event."""
  acc = pea.EventAccumulator(folder, size_guidance=pea.STORE_EVERYTHING_SIZE_GUIDANCE)
  acc.Reload()
  return acc


def _write_everything(writer):
  writer.write_scalars(1, {"train/loss": 0.25, "train/lr": np.float32(1e-3)})
  writer.write_scalars(2, {"train/loss": 0.125})
  writer.write_images(2, {"grid": IMAGES, "gray": GRAY})
  writer.write_texts(2, {"note": "héllo *markdown*"})
  writer.write_histograms(2, {"weights": VALUES}, num_buckets={"weights": 12})


def test_tensorboard_and_tensorflow_read_back_what_was_written(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path))
  _write_everything(writer)
  writer.close()

  acc = _tensorboard(str(tmp_path))
  by_plugin = {
      p: set(acc.PluginTagToContent(p)) for p in ("scalars", "images", "text", "histograms")
  }
  assert by_plugin == {
      "scalars": {"train/loss", "train/lr"},
      "images": {"grid", "gray"},
      "text": {"note"},
      "histograms": {"weights"},
  }
  loss = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")]
  assert [s for s, _ in loss] == [1, 2] and all(v.dtype == np.float32 for _, v in loss)
  assert [float(v) for _, v in loss] == [0.25, 0.125]
  lr = tensor_util.make_ndarray(acc.Tensors("train/lr")[0].tensor_proto)
  assert lr == np.float32(1e-3)

  [path] = _files(str(tmp_path))
  events = _tf_events(path)
  assert events[0].file_version == "brain.Event:2"
  values = {(e.step, v.tag): tf.make_ndarray(v.tensor) for e in events[1:] for v in e.summary.value}
  assert values[(1, "train/loss")] == np.float32(0.25) and values[(1, "train/loss")].ndim == 0
  assert values[(2, "train/loss")].dtype == np.float32

  grid = values[(2, "grid")]  # [width, height, png, png]
  assert list(grid[:2]) == [b"7", b"5"] and len(grid) == 4
  np.testing.assert_array_equal(np.stack([tf.io.decode_png(p).numpy() for p in grid[2:]]), IMAGES)
  gray = values[(2, "gray")]
  np.testing.assert_array_equal(tf.io.decode_png(gray[2]).numpy(), GRAY)
  assert values[(2, "note")].item().decode("utf-8") == "héllo *markdown*"

  buckets = values[(2, "weights")]  # [k, 3]: left edge, right edge, count
  assert buckets.shape == (12, 3) and buckets[:, 2].sum() == VALUES.size
  assert buckets[0, 0] == VALUES.min() and buckets[-1, 1] == VALUES.max()
  np.testing.assert_array_equal(buckets[1:, 0], buckets[:-1, 1])  # contiguous buckets
  assert (
      values[(2, "weights")].tolist()
      == tensor_util.make_ndarray(acc.Tensors("weights")[0].tensor_proto).tolist()
  )


def test_same_records_as_tf_summary(tmp_path):
  """clu's SummaryWriter (tf.summary) and ours, given the same writes: same tags, steps,
  metadata, dtypes, shapes and values (PNGs compared decoded: encoders may compress
  differently; WAVs compared byte for byte)."""
  from clu.metric_writers import SummaryWriter

  audio = RNG.uniform(-1.2, 1.2, (2, 50, 2)).astype(np.float32)  # [N, T, C], some clipped
  float_image = RNG.uniform(-0.1, 1.1, (3, 4, 3)).astype(np.float32)
  custom = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="custom", content=b"\x01")
  )
  records = []
  for name, writer in (
      ("ours", summaries.EventFileWriter(str(tmp_path / "ours"))),
      ("tf", SummaryWriter(str(tmp_path / "tf"))),
  ):
    _write_everything(writer)
    writer.write_images(3, {"float": float_image})
    writer.write_histograms(3, {"constant": np.full(5, 2.0), "empty": np.zeros(0)})
    writer.write_audios(3, {"sound": audio}, sample_rate=8000)
    writer.write_summaries(
        3, {"raw": np.arange(6, dtype=np.int32).reshape(2, 3)}, {"raw": custom.SerializeToString()}
    )
    writer.close()
    [path] = _files(str(tmp_path / name))
    records.append([(e.step, v) for e in _tf_events(path)[1:] for v in e.summary.value])
  ours, theirs = records
  assert len(ours) == len(theirs) == 12
  for (step, a), (tf_step, b) in zip(ours, theirs):
    assert (step, a.tag, a.metadata) == (tf_step, b.tag, b.metadata)
    x, y = tf.make_ndarray(a.tensor), tf.make_ndarray(b.tensor)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), a.tag
    if a.metadata.plugin_data.plugin_name == "images":
      assert list(x[:2]) == list(y[:2])
      for p, q in zip(x[2:], y[2:]):
        np.testing.assert_array_equal(tf.io.decode_png(p).numpy(), tf.io.decode_png(q).numpy())
    else:
      assert x.tolist() == y.tolist(), a.tag


def test_hparams_are_the_plugins_session_start(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path))
  writer.write_hparams({"lr": 0.1, "model": {"depth": 4, "norm": None}, "sizes": [8, 16]})
  writer.close()
  acc = _tensorboard(str(tmp_path))
  [tag] = acc.PluginTagToContent("hparams")
  from tensorboard.plugins.hparams import metadata

  start = metadata.parse_session_start_info_plugin_data(
      acc.SummaryMetadata(tag).plugin_data.content
  )
  hparams = {
      k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()
  }
  assert hparams == {
      "lr": 0.1,
      "model.depth": 4.0,
      "model.norm": "",
      "sizes.0": 8.0,
      "sizes.1": 16.0,
  }


def test_framing_is_tfrecord_byte_for_byte(tmp_path):
  payloads = [b"", b"x", bytes(range(256)) * 40]
  path = str(tmp_path / "reference.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for p in payloads:
      w.write(p)
  with open(path, "rb") as f:
    assert b"".join(summaries.tfrecord(p) for p in payloads) == f.read()

  writer = summaries.EventFileWriter(str(tmp_path / "run"))
  writer.write_scalars(0, {"a": 1.0})
  writer.flush()
  [events] = _files(str(tmp_path / "run"))
  # TFRecordDataset checks both checksums of every record.
  assert len(list(tf.data.TFRecordDataset(events))) == 2  # header + one event


def test_each_flush_is_one_complete_file_in_write_order(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path))
  writer.flush()
  writer.close()
  assert _files(str(tmp_path)) == []  # nothing pending: no file, not even a header

  for step in range(12):  # many files within one second: the sequence orders them
    writer.write_scalars(step, {"loss": float(step)})
    writer.flush()
    writer.flush()  # nothing new: no file
  files = _files(str(tmp_path))
  assert len(files) == 12
  for step, path in enumerate(files):  # sorted name order is write order; each reads alone
    events = _tf_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert [(e.step, v.tag) for e in events[1:] for v in e.summary.value] == [(step, "loss")]
  steps = [e.step for e in _tensorboard(str(tmp_path)).Tensors("loss")]
  assert steps == list(range(12))


def test_default_writer_writes_on_flush_and_just_logging_writes_nothing(tmp_path):
  writer = summaries.create_default_writer(str(tmp_path / "run"))
  writer.write_scalars(3, {"eval/psnr": 21.5})
  writer.write_videos(3, {"clip": np.zeros((2, 4, 4, 3))})  # logged only, as clu's writer
  assert _files(str(tmp_path / "run")) == []
  writer.flush()  # waits for the background thread, then writes
  [path] = _files(str(tmp_path / "run"))
  [event] = _tf_events(path)[1:]
  assert event.step == 3 and tf.make_ndarray(event.summary.value[0].tensor) == np.float32(21.5)

  quiet = summaries.create_default_writer(str(tmp_path / "quiet"), just_logging=True)
  quiet.write_scalars(3, {"eval/psnr": 21.5})
  quiet.close()
  assert not os.path.exists(tmp_path / "quiet")


def test_a_gs_logdir_goes_through_the_path_layer(object_store):  # noqa: F811
  writer = summaries.create_default_writer("gs://bucket/run")
  writer.write_scalars(7, {"train/loss": 0.5})
  writer.close()
  [path] = _files(str(object_store / "bucket" / "run"))  # in the store, nowhere else
  [event] = _tf_events(path)[1:]
  assert event.step == 7 and tf.make_ndarray(event.summary.value[0].tensor) == np.float32(0.5)
  assert [os.path.basename(p) for p in summaries.fileio.glob("gs://bucket/run", "*")] == [
      os.path.basename(path)
  ]


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 5), np.uint8), np.zeros((2, 2, 3), np.int32)])
def test_images_that_tensorboard_cannot_show_are_refused(tmp_path, bad):
  with pytest.raises((ValueError, TypeError)):
    summaries.EventFileWriter(str(tmp_path)).write_images(0, {"bad": bad})
