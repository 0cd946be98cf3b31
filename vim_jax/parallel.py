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
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int,
                       unit: str = "devices") -> tuple[int, ...]:
  """Fills one -1 entry so that the product equals num_devices; errors name the fix."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} {unit} are not divisible by "
          f"{known}; change config.mesh so the fixed axes divide the device count.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} {unit} but "
        f"{num_devices} are available; set one axis to -1 or make the product {num_devices}.")
  return tuple(shape)


def _ici_device_array(shape: tuple[int, ...], devices: list) -> np.ndarray:
  try:
    from jax.experimental import mesh_utils  # topology-aware ordering on TPU/GPU
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except; e.g. a subset of CPU devices
    return np.asarray(devices).reshape(shape)


def granules(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
  """Devices grouped by slice (TPU multi-slice: device.slice_index) when they span several,
  else by process (one host per granule, as on GPU clusters), in a stable order."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  by_slice = None not in slices and len(slices) > 1
  key = (lambda d: d.slice_index) if by_slice else (lambda d: d.process_index)
  groups: dict[int, list] = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  return [groups[k] for k in sorted(groups)]


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all) with axes (data, fsdp, tensor) and Auto axis types.

  mesh_config.{data,fsdp,tensor} lay out the devices of one slice (ICI); the optional
  mesh_config.dcn_{data,fsdp,tensor} (default 1) lay out the slices, or the hosts when the
  devices are all in one slice, over the data-center network. Each mesh axis is then
  ici_size x dcn_size, with the DCN part outermost, so collectives on a DCN axis cross slices
  once. Put data parallelism on DCN (dcn_data=-1): it only all-reduces gradients once a step.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = {a: int(mesh_config.get(f"dcn_{a}", 1)) for a in MESH_AXES}
  if all(v == 1 for v in dcn.values()):
    device_array = _ici_device_array(resolve_mesh_shape(dict(mesh_config), len(devices)),
                                     devices)
  else:
    groups = granules(devices)
    dcn_shape = resolve_mesh_shape(dcn, len(groups), "slices (or hosts)")
    ici_shape = resolve_mesh_shape({a: mesh_config[a] for a in MESH_AXES}, len(groups[0]))
    if any(len(g) != len(groups[0]) for g in groups):
      raise ValueError(f"slices have different device counts {[len(g) for g in groups]}; "
                       "a DCN mesh needs equal slices.")
    blocks = np.empty(dcn_shape, dtype=object)
    for index, group in zip(np.ndindex(*dcn_shape), groups):
      blocks[index] = _ici_device_array(ici_shape, group)
    device_array = np.block(blocks.tolist())
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_rules(config) -> tuple[tuple[str, object], ...]:
  rules = config.get("axis_rules") or DEFAULT_AXIS_RULES
  return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in rules)


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


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global jax.Arrays sharded over the batch axes from this process's slice of the batch.
  uint8 images cross to the devices as uint8 and become float32 in [-1, 1] there."""
  sharding = batch_sharding(mesh)
  batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
  if "image" in batch and batch["image"].dtype == jnp.uint8:
    batch["image"] = _images_to_unit_range(batch["image"])
  return batch


@jax.jit
def _images_to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 -> float32 in [-1, 1] where the images are (the output keeps their sharding)."""
  from vim_jax.data import preprocess
  return preprocess.to_unit_range(images)
