"""TensorBoard event files written through vim_jax.infra.fileio, for local folders and gs:// alike.

clu's default writer goes through tf.summary, whose GCS client has its own hard-wired endpoint
(so it cannot be pointed at a GCS emulator) and bypasses the project's path layer. This module
writes the same records itself: `Event` protos from tensorboard.compat.proto, TFRecord-framed,
each summary encoded exactly as tf.summary v2 encodes it (tensor, dtype and plugin metadata), so
TensorBoard, `tf.compat.v1.train.summary_iterator` and tests/run_files.py read them unchanged.

GCS objects cannot be appended to, so events are kept in memory and every `flush()` that has
any writes ONE new, complete event file (its own file_version header and the pending events).
Local folders get the same treatment: one code path, and each file appears whole (fileio writes
it atomically), so a TensorBoard reading while we write never sees half a record. File names
sort in write order (see `_next_file_name`), which TensorBoard's loader relies on: it reads a
run folder's event files in lexicographic order.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import threading
import time
import wave
from collections.abc import Mapping
from typing import Any

import google_crc32c  # comes with google-cloud-storage (declared in setup.py)
import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.audio import metadata as audio_metadata
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.util import tensor_util

from vim_jax.infra import fileio

FILE_VERSION = "brain.Event:2"  # what tf.summary v2 writes: TensorBoard reads tensor summaries
DEFAULT_HISTOGRAM_BUCKETS = 30  # tf.summary.histogram's default


# ----------------------------------------------------------------------------------------------
# TFRecord framing: uint64 length, masked crc32c of the length, data, masked crc32c of the data.
# ----------------------------------------------------------------------------------------------
def _masked_crc32c(data: bytes) -> int:
  # TFRecord masks the checksum so that a CRC of data that itself holds CRCs stays robust.
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: the framing tf.io.TFRecordWriter (and tf.summary) writes around `data`."""
  length = struct.pack("<Q", len(data))
  return (
      length
      + struct.pack("<I", _masked_crc32c(length))
      + data
      + struct.pack("<I", _masked_crc32c(data))
  )


# ----------------------------------------------------------------------------------------------
# File names that sort in write order.
# ----------------------------------------------------------------------------------------------
_name_lock = threading.Lock()
_last_second = 0
_sequence = itertools.count()  # process-wide: two writers on one folder never share a name


def _next_file_name() -> str:
  """events.out.tfevents.<seconds>.<host>.<pid>.<sequence>.v2, later than every name this
  process gave before. TensorBoard's DirectoryWatcher reads files in sorted order and skips any
  that sorts before the one it has read, so the seconds never go back (even if the clock does)
  and the sequence orders the files written in one second."""
  global _last_second
  with _name_lock:
    _last_second = max(_last_second, int(time.time()))
    return (
        f"events.out.tfevents.{_last_second:010d}.{socket.gethostname()}.{os.getpid()}."
        f"{next(_sequence):06d}.v2"
    )


# ----------------------------------------------------------------------------------------------
# Encodings, as tf.summary v2 writes them.
# ----------------------------------------------------------------------------------------------
def _to_uint8(images: np.ndarray) -> np.ndarray:
  """As tf.image.convert_image_dtype(saturate=True): floats in [0, 1] scaled by 255.5 and
  truncated, out-of-range values clipped."""
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    return np.clip(images.astype(np.float64) * 255.5, 0, 255).astype(np.uint8)
  raise TypeError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, C] with C in 1 (gray), 2 (gray+alpha), 3 (RGB), 4 (RGBA) -> PNG bytes."""
  channels = image.shape[-1]
  if channels not in (1, 2, 3, 4):
    raise ValueError(f"an image needs 1 to 4 channels, got shape {image.shape}")
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def _wav(audio: np.ndarray, sample_rate: int) -> bytes:
  """float [T, C] in [-1, 1] -> 16-bit PCM WAV, rounded (halves away from zero, as C's roundf)
  and clipped as tf.audio.encode_wav."""
  scaled = audio.astype(np.float64) * 32768
  samples = np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), -32768, 32767)
  samples = samples.astype("<i2")
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as w:
    w.setnchannels(audio.shape[1])
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(samples.tobytes())
  return buffer.getvalue()


def histogram_buckets(values: np.ndarray, buckets: int = DEFAULT_HISTOGRAM_BUCKETS) -> np.ndarray:
  """float64 [buckets, 3] rows (left edge, right edge, count), as tf.summary.histogram:
  `buckets` equal widths from min to max, the last one closed on the right; all zeros for no
  data; for a single distinct value every edge is that value and the last bucket counts all."""
  values = np.asarray(values, np.float64).reshape(-1)
  if buckets <= 0 or values.size == 0:
    return np.zeros((max(buckets, 0), 3))
  low, high = values.min(), values.max()
  if low == high:
    counts = np.zeros(buckets)
    counts[-1] = values.size
    return np.stack([np.full(buckets, high), np.full(buckets, high), counts], axis=1)
  index = np.minimum(
      np.floor((values - low) / ((high - low) / buckets)).astype(np.int64), buckets - 1
  )
  counts = np.bincount(index, minlength=buckets).astype(np.float64)
  edges = np.linspace(low, high, buckets + 1)
  edges[-1] = high
  return np.stack([edges[:-1], edges[1:], counts], axis=1)


def _flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}, 'c': [2, None]} -> {'a.b': 1, 'c.0': 2, 'c.1': ''}, as clu flattens
  hyperparameters for the hparams plugin (which takes bool, int, float and str only)."""
  flat = {}
  for key, value in hparams.items():
    if isinstance(value, (list, tuple)):
      value = {str(i): v for i, v in enumerate(value)}
    if hasattr(value, "items"):
      flat.update(_flat_hparams(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = "" if value is None else value
  return flat


class EventFileWriter(metric_writers.MetricWriter):
  """A clu MetricWriter that writes TensorBoard event files through vim_jax.infra.fileio.

  Writes are kept in memory until `flush()` (or `close()`), which writes them as one new
  event file in `logdir` (see the module docstring); nothing is written before, and a flush
  with nothing pending writes nothing. Flush at every log step so TensorBoard shows the run
  as it goes.
  """

  def __init__(self, logdir: str):
    self.logdir = str(logdir)
    self._pending: list[bytes] = []  # serialized Event protos, in write order
    # clu's AsyncWriter writes from its thread and flushes from the caller's.
    self._lock = threading.Lock()

  def _add(
      self, step: int, tag: str, array: np.ndarray, metadata: summary_pb2.SummaryMetadata
  ) -> None:
    """One event holding one tensor summary, as tf.summary writes each call."""
    tensor = tensor_util.make_tensor_proto(array)
    self._add_summary(
        step,
        summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)]
        ),
    )

  def _add_summary(self, step: int, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    with self._lock:
      self._pending.append(event.SerializeToString())

  def write_summaries(
      self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
  ):
    """Raw tensors; `metadata[key]` is a SummaryMetadata proto or its serialized bytes."""
    for key, value in values.items():
      md = (metadata or {}).get(key)
      if md is None:
        md = summary_pb2.SummaryMetadata()
      elif isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      self._add(step, key, np.asarray(value), md)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Each value (a number or a one-element array) as a float32 scalar tensor."""
    md = scalar_metadata.create_summary_metadata(display_name="", description="")
    for key, value in scalars.items():
      self._add(step, key, np.asarray(value, np.float32).reshape(()), md)

  def write_images(self, step: int, images: Mapping[str, Any]):
    """[N, H, W, C] or [H, W, C] images, uint8 or floats in [0, 1], C in 1..4. Stored as
    tf.summary.image does: a string tensor [width, height, png_0, ..., png_{N-1}]."""
    md = image_metadata.create_summary_metadata(display_name="", description="")
    for key, value in images.items():
      value = _to_uint8(np.asarray(value))
      if value.ndim == 3:
        value = value[None]
      if value.ndim != 4:
        raise ValueError(f"image {key!r} must be [N, H, W, C] or [H, W, C], got {value.shape}")
      header = [str(value.shape[2]).encode(), str(value.shape[1]).encode()]
      self._add(step, key, np.array(header + [_png(im) for im in value], dtype=object), md)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    # TensorBoard has no video plugin; clu's SummaryWriter warns once and drops them too.
    logging.log_first_n(logging.WARNING, "EventFileWriter does not write videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    """[N, T, C] floats in [-1, 1] as tf.summary.audio: a string tensor [N, 2] of
    (WAV bytes, label '')."""
    md = audio_metadata.create_summary_metadata(
        display_name="", description="", encoding=audio_metadata.Encoding.Value("WAV")
    )
    for key, value in audios.items():
      value = np.asarray(value)
      if value.ndim != 3:
        raise ValueError(f"audio {key!r} must be [N, T, C], got {value.shape}")
      rows = [[_wav(clip, sample_rate), b""] for clip in value]
      self._add(step, key, np.array(rows, dtype=object).reshape(len(rows), 2), md)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    """Each text as a scalar UTF-8 string tensor (TensorBoard renders markdown)."""
    md = text_metadata.create_summary_metadata(display_name="", description="")
    for key, value in texts.items():
      self._add(step, key, np.array(value.encode("utf-8"), dtype=object), md)

  def write_histograms(
      self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
  ):
    """Each array (any shape) as a float64 [k, 3] tensor of (left, right, count) buckets;
    k is num_buckets[key], else 30."""
    md = histogram_metadata.create_summary_metadata(display_name="", description="")
    for key, value in arrays.items():
      buckets = (num_buckets or {}).get(key) or DEFAULT_HISTOGRAM_BUCKETS
      self._add(step, key, histogram_buckets(np.asarray(value), buckets), md)

  def write_hparams(self, hparams: Mapping[str, Any]):
    """The hparams plugin's session-start summary at step 0, as clu's SummaryWriter writes it
    (nested mappings and lists flattened to dotted names)."""
    self._add_summary(0, hparams_summary.hparams_pb(_flat_hparams(hparams)))

  def flush(self):
    """Writes the pending events as one new event file (none if nothing is pending)."""
    with self._lock:  # held through the write, so that file names follow write order
      if not self._pending:
        return
      header = event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION)
      data = b"".join(tfrecord(e) for e in [header.SerializeToString(), *self._pending])
      fileio.write_bytes(fileio.join(self.logdir, _next_file_name()), data)
      self._pending = []  # only once written: a failed write keeps them for the next flush

  def close(self):
    self.flush()


def create_default_writer(
    logdir: str, *, just_logging: bool = False, asynchronous: bool = True
) -> metric_writers.MetricWriter:
  """Like clu.metric_writers.create_default_writer: every value goes to the absl log and,
  unless just_logging (processes other than 0), to event files in `logdir` (EventFileWriter).
  Asynchronous like clu's: writes (PNG encoding included) run in a background thread, and
  flush() waits for them before writing the file."""
  writers: list[metric_writers.MetricWriter] = [metric_writers.LoggingWriter()]
  if not just_logging:
    writers.append(EventFileWriter(logdir))
  if asynchronous:
    return metric_writers.AsyncMultiWriter(writers)
  return metric_writers.MultiWriter(writers)
