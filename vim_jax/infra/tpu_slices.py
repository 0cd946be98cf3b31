"""Google Cloud TPU slices by name, and compile-only devices for them on a machine with no TPU.

  spec = tpu_slices.parse("v4-128")     # 64 chips, 4x4x4, 32 GiB HBM per chip
  devices = tpu_slices.compile_only_devices(spec)

libtpu (`pip install '.[tpu]'`) compiles for a slice it does not have: jax's
`topologies.get_topology_desc` gives one device per chip (v4 and v5p chips run their two
TensorCores as one "megacore" device), and a program lowered over a mesh of them compiles with
the TPU compiler, so its memory analysis is the real chip's (MaxText's train_compile.py and
axlearn's AOT tool work the same way). Nothing can run on these devices.

Slice names count TensorCores for v4 and v5p (2 per chip: v4-8 is 4 chips) and chips for v5e
and v6e (v5e-8 is 8 chips), as Google Cloud does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str
  cores_per_chip: int  # TensorCores a slice name counts per chip
  dims: int  # torus dimensions of its slices
  chip_config: str  # libtpu's chip config: megacore = the chip's cores as one device
  hbm_bytes: int  # per chip
  peak_bf16_flops: float  # per chip per second, Google Cloud's published figure
  host_shape: tuple[int, int, int]  # the chips one host (TPU VM worker) holds
  hbm_bytes_per_second: float  # per chip, Google Cloud's published HBM bandwidth


# Per-chip figures and hosts from the Google Cloud TPU system-architecture pages: v4 and v5p
# hosts hold 2x2x1 chips (a v4-128, 4x4x4, is 16 hosts); v5e and v6e hosts hold 8 chips, 2x4
# ("Chips per host: 8"; a v5e-16, 4x4, is 2 hosts). Slices smaller than a host are one host.
# HBM bandwidth per chip from the same pages (v4: 1.2 TB/s, taken as 1228 GB/s; v5e 819 GB/s,
# v5p 2765 GB/s, v6e 1640 GB/s): a KV-cached decode step is bound by it, not by the FLOPs.
GENERATIONS = {
    "v4": Generation("v4", 2, 3, "megacore", 32 * GIB, 275e12, (2, 2, 1), 1228e9),
    "v5p": Generation("v5p", 2, 3, "megacore", 95 * GIB, 459e12, (2, 2, 1), 2765e9),
    "v5e": Generation("v5e", 1, 2, "default", 16 * GIB, 197e12, (2, 4, 1), 819e9),
    "v6e": Generation("v6e", 1, 2, "default", 32 * GIB, 918e12, (2, 4, 1), 1640e9),
}
ALIASES = {"v5litepod": "v5e"}
# jax's device_kind of each generation's chip ('TPU v5 lite' is a v5e, 'TPU v6 lite' a v6e).
DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}


def generation_of_device_kind(kind: str) -> Generation | None:
  """The Generation of a jax TPU device's device_kind (None when unknown)."""
  name = DEVICE_KINDS.get(kind.strip())
  return GENERATIONS[name] if name else None


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """A slice named like Google Cloud's accelerator types (v4-128, v5e-16, ...)."""

  name: str
  generation: Generation
  chips: int
  shape: tuple[int, ...]  # chips along each torus axis

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. 'v4:4x4x4'."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """The chips of one host along each torus axis (3 entries; a 2-D slice's third is 1):
    the generation's host, cut to the slice when the slice is smaller."""
    shape = tuple(self.shape) + (1,) * (3 - len(self.shape))
    return tuple(min(h, s) for h, s in zip(self.generation.host_shape, shape))

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.host_bounds)


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The shape Google Cloud gives a slice of `chips` chips (a power of 2): from 2x2x1 (3-D)
  or 2x2 (2-D), the shortest axis doubles, the last of equals first: 2x2x2, 2x2x4, 2x4x4,
  4x4x4, 4x4x8, ... and 2x4, 4x4, 4x8, 8x8, ... Single-host v5e / v6e slices of 1 and 2 chips
  are 1x1 and 1x2."""
  if chips < 4:
    return (1,) * (dims - 2) + (1, chips) if dims == 2 else (1, 1, chips)
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return tuple(shape)


def parse(name: str) -> SliceSpec:
  """'v4-128' -> its chips and torus shape. Raises ValueError naming the accepted forms."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
  usage = (
      "expected a Google Cloud slice name: v4-N or v5p-N (N TensorCores, 2 per chip, "
      "e.g. v4-128 = 64 chips; the smallest is -8), v5e-N / v5litepod-N or v6e-N "
      "(N chips), with N a power of 2"
  )
  if not match:
    raise ValueError(f"--topology={name!r}: {usage}.")
  generation = GENERATIONS[ALIASES.get(match.group(1), match.group(1))]
  count = int(match.group(2))
  chips, remainder = divmod(count, generation.cores_per_chip)
  smallest = 4 if generation.dims == 3 else 1  # v4-8 and v5p-8 are the smallest 3-D slices
  if remainder or chips < smallest or chips & (chips - 1):
    raise ValueError(f"--topology={name!r}: {usage}.")
  return SliceSpec(name, generation, chips, torus_shape(chips, generation.dims))


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


INSTALL_HINT = (
    "libtpu is not installed; it compiles for TPU slices on this machine. Install "
    "the version the installed jax needs with: pip install '.[tpu]' (from the "
    "repository root)."
)


def prepare_environment():
  """Environment libtpu reads when it loads: no TPU metadata server to ask (this machine is not
  a TPU VM), a stated accelerator and one local worker, so it neither waits nor warns; and no
  claim on /tmp/libtpu_lockfile, which guards real chips from a second process (compiling
  needs none, and a training job on a TPU VM may hold it). JAX itself stays on the CPU:
  compile-only devices need no backend, and eager ops (keys, constants) must not be placed
  on them."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # RngBitGenerator partitioned per chip, as vim_jax/main.py sets it for rbg dropout (the TPU
  # default): without it each chip's program would draw the whole batch's masks.
  from vim_jax.infra import prng  # lazy: imports jax, which reads JAX_PLATFORMS on import

  prng.name_libtpu_flag(os.environ)


def compile_only_devices(spec: SliceSpec, num_slices: int = 1) -> list:
  """One compile-only device per chip of `num_slices` slices of `spec`."""
  if not libtpu_available():
    raise RuntimeError(INSTALL_HINT)
  prepare_environment()
  from jax.experimental import topologies  # lazy: jax only after prepare_environment
  # The hosts as the hardware has them: the devices' process indices (which host feeds which
  # chips) come from here; the compiled program does not depend on them.
  description = topologies.get_topology_desc(
      topology_name=spec.topology,
      platform="tpu",
      chip_config_name=spec.generation.chip_config,
      chips_per_host_bounds=spec.host_bounds,
      num_slices=num_slices,
  )
  devices = list(description.devices)
  expected = spec.chips * num_slices
  if len(devices) != expected:
    raise RuntimeError(
        f"libtpu gave {len(devices)} devices for {num_slices} x {spec.name} "
        f"({spec.topology}); expected {expected}."
    )
  return devices
