"""Device mesh from the config, logical axis rules, and shardings of state trees and batches.

The mesh has three axes named by purpose:
  data:   pure data parallelism (params replicated),
  fsdp:   data parallelism with params, gradients and optimizer state sharded (ZeRO-3 style),
  tensor: model (Megatron) parallelism over heads and MLP units.
A size of -1 takes the devices left over by the others. Models name their axes logically
('embed', 'mlp', 'act_batch', ...); `config.axis_rules` maps those names to mesh axes, so a
layout is a config change.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import socket
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vim_jax.data import preprocess

MESH_AXES = ("data", "fsdp", "tensor")

# Batch dimension of inputs and activations is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

DEFAULT_AXIS_RULES = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("length", None),
    ("layers", None),  # the stacked blocks of a scanned Transformer (scan_layers)
    ("patch", None),
    ("code_dim", None),
    ("codebook", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("conv_in", None),  # the discriminator and LPIPS convs are small: replicated
    ("conv_out", None),
)


def resolve_mesh_shape(
    sizes: dict[str, int], num_devices: int, unit: str = "devices"
) -> tuple[int, ...]:
  """Fills one -1 entry so that the product equals num_devices; errors name the fix."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} {unit} are not divisible by "
          f"{known}; change config.mesh so the fixed axes divide the device count."
      )
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} {unit} but "
        f"{num_devices} are available; set one axis to -1 or make the product {num_devices}."
    )
  return tuple(shape)


def _ici_device_array(shape: tuple[int, ...], devices: list) -> np.ndarray:
  try:
    # mesh_utils orders the devices by the topology (on TPU and GPU).
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except; e.g. a subset of CPU devices
    return np.asarray(devices).reshape(shape)


def granules(
    devices: Sequence[jax.Device], host_of_process: dict[int, int] | None = None
) -> list[list[jax.Device]]:
  """Devices grouped by slice (TPU multi-slice: device.slice_index) when they span several,
  else by host, in a stable order. A host is a machine: on a GPU cluster with one process per
  GPU (SLURM), a node's 8 processes are one host (`host_of_process`, default
  `process_hosts()`); elsewhere each process is its own host."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  by_slice = None not in slices and len(slices) > 1
  if not by_slice and host_of_process is None:
    host_of_process = process_hosts()
  key = (
      (lambda d: d.slice_index)
      if by_slice
      else (lambda d: host_of_process.get(d.process_index, d.process_index))
  )
  groups: dict[int, list] = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  return [groups[k] for k in sorted(groups)]


def process_hosts() -> dict[int, int]:
  """{process index: host number} of this job's processes, hosts numbered by their first
  process. A host is named by SLURM_NODEID under SLURM, else by the machine's hostname; each
  process says its own and all gather them (a collective: every process calls this). {} in a
  single process, where each (compile-only) device's process stands for a host."""
  if jax.process_count() == 1:
    return {}
  name = os.environ.get("SLURM_NODEID") or socket.gethostname()
  digest = np.frombuffer(hashlib.sha256(name.encode()).digest()[:4], np.int32)  # x64 is off
  names = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
  first: dict[int, int] = {}
  return {p: first.setdefault(int(n), len(first)) for p, n in enumerate(names)}


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all) with axes (data, fsdp, tensor) and Auto axis types.

  mesh_config.{data,fsdp,tensor} lay out the devices of one slice (ICI); the optional
  mesh_config.dcn_{data,fsdp,tensor} (default 1) lay out the slices, or the hosts (machines:
  a GPU node with one process per GPU is one host) when the devices are all in one slice, over
  the data-center network. Each mesh axis is then
  ici_size x dcn_size, with the DCN part outermost, so collectives on a DCN axis cross slices
  once. Put data parallelism on DCN (dcn_data=-1): it only all-reduces gradients once a step.
  """
  devices = list(jax.devices() if devices is None else devices)
  # Optional: one-slice meshes built in code (dict(data=-1, fsdp=1, tensor=1)) have no DCN part.
  dcn = {a: int(mesh_config.get(f"dcn_{a}", 1)) for a in MESH_AXES}
  if all(v == 1 for v in dcn.values()):
    device_array = _ici_device_array(resolve_mesh_shape(dict(mesh_config), len(devices)), devices)
  else:
    groups = granules(devices)
    dcn_shape = resolve_mesh_shape(dcn, len(groups), "slices (or hosts)")
    ici_shape = resolve_mesh_shape({a: mesh_config[a] for a in MESH_AXES}, len(groups[0]))
    if any(len(g) != len(groups[0]) for g in groups):
      raise ValueError(
          f"slices have different device counts {[len(g) for g in groups]}; "
          "a DCN mesh needs equal slices."
      )
    blocks = np.empty(dcn_shape, dtype=object)
    for index, group in zip(np.ndindex(*dcn_shape), groups):
      blocks[index] = _ici_device_array(ici_shape, group)
    device_array = np.block(blocks.tolist())
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_rules(config) -> tuple[tuple[str, object], ...]:
  """config.axis_rules as a tuple (config.json stores its pairs as lists)."""
  return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in config.axis_rules)


@contextlib.contextmanager
def tracing_context(mesh: Mesh, rules):
  """Where jitted functions must be traced/compiled: activation constraints need both."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves may be nn.Partitioned boxes (others replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_rows(mesh: Mesh, global_batch_size: int, process_index: int | None = None) -> np.ndarray:
  """The rows of a [global_batch_size, ...] batch that the devices of `process_index` (default:
  this process) hold under batch_sharding(mesh), sorted, each once: the rows that process
  loads. They are a contiguous 1/P of the batch only when the batch axes alone span the
  processes; when the tensor (or any other) axis spans processes too (VIM-Large's tensor=4 on
  a v4-128 puts each tensor group on 2 hosts), several processes hold the same rows and each
  must load them, identically."""
  if process_index is None:
    process_index = jax.process_index()
  return np.asarray(_batch_rows(mesh, global_batch_size, process_index), dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _batch_rows(mesh: Mesh, global_batch_size: int, process_index: int) -> tuple[int, ...]:
  rows: set[int] = set()
  index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
  for device, index in index_map.items():
    if device.process_index == process_index:
      rows.update(range(*index[0].indices(global_batch_size)))
  return tuple(sorted(rows))


def global_batch_from_local(
    local_batch: dict[str, np.ndarray],
    mesh: Mesh,
    global_batch_size: int,
    images_from_uint8: bool = True,
) -> dict[str, jax.Array]:
  """Global [global_batch_size, ...] jax.Arrays sharded over the batch axes, from this
  process's rows of the batch (`batch_rows(mesh, global_batch_size)`, in that order). uint8
  images cross to the devices as uint8 and become float32 in [-1, 1] there (unless
  images_from_uint8 is False)."""
  sharding = batch_sharding(mesh)
  rows = (
      len(batch_rows(mesh, global_batch_size)) if jax.process_count() > 1 else (global_batch_size)
  )
  batch = {}
  for key, value in local_batch.items():
    if len(value) != rows:
      raise ValueError(
          f"batch[{key!r}] holds {len(value)} rows; this process's devices hold "
          f"{rows} of the global batch of {global_batch_size} (load them with "
          "parallel.batch_rows)."
      )
    batch[key] = jax.make_array_from_process_local_data(
        sharding, value, (global_batch_size,) + value.shape[1:]
    )
  if images_from_uint8 and "image" in batch and batch["image"].dtype == jnp.uint8:
    batch["image"] = _images_from_uint8(batch["image"])
  return batch


def replicate(tree, mesh: Mesh):
  """A copy of tree (arrays of this process) on every device of `mesh`. Through the host: in a
  multi-process job a process's device arrays cannot be put on a sharding that spans other
  processes' devices, while a host array is taken to be the same on every process."""
  return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))


def fetch(tree):
  """Host numpy copies of a tree of global jax.Arrays, whole on every process (arrays spread
  over several processes are gathered: jax refuses to read them directly)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


@jax.jit
def _images_from_uint8(images: jax.Array) -> jax.Array:
  """uint8 -> float32 in [-1, 1] where the images are (the output keeps their sharding)."""
  return preprocess.from_uint8(images)
