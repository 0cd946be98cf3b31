"""Which batch rows each host feeds, on the real host layouts of TPU slices (issue 27).

libtpu's compile-only devices (vim_jax/infra/tpu_slices.py) carry the process index of the host that
owns each chip, as on the slice: v4/v5p hosts of 2x2x1 chips, v5e/v6e hosts of 8. Every paper
config's default mesh and the documented alternatives (launch/README.md, "Mesh layouts") are
built over them with `parallel.create_mesh`, and the rows `parallel.batch_rows` gives each
process are checked against the batch sharding's device-to-index map: every row is fed, each
process feeds exactly the rows its chips hold (each once, in the order
`jax.make_array_from_process_local_data` maps them to its devices), and processes that share a
shard feed identical examples.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from vim_jax.data import pipeline, sources
from vim_jax.infra import parallel, tpu_slices

SLICES = (
    "v4-8",
    "v4-16",
    "v4-32",
    "v4-64",
    "v4-128",
    "v5p-8",
    "v5p-16",
    "v5p-32",
    "v5p-64",
    "v5p-128",
    "v5e-1",
    "v5e-4",
    "v5e-8",
    "v5e-16",
    "v5e-32",
    "v5e-64",
    "v5e-256",
    "v6e-4",
    "v6e-8",
    "v6e-16",
    "v6e-64",
    "v6e-256",
)
# (config file, mesh overrides): the paper configs' defaults and launch/README.md's layouts.
LAYOUTS = (
    ("vitvq_small.py", {}),
    ("vitvq_base.py", {}),
    ("vitvq_large.py", {}),
    ("vim_base.py", {}),
    ("vim_large.py", {}),
    ("vim_large.py", {"data": 1, "fsdp": -1, "tensor": 4}),
)
MULTI_SLICE = (("v4-128", 2), ("v5p-128", 2), ("v4-32", 2))
MULTI_SLICE_LAYOUTS = (
    ("vim_large.py", {"data": 1, "fsdp": -1, "tensor": 4, "dcn_data": 2}),
    ("vitvq_base.py", {"data": -1, "dcn_data": 2}),
)


def _config(name):
  from test_config_checks import _load

  return _load(name)


def _mesh(config, overrides, devices):
  mesh_config = dict(config.mesh)
  mesh_config.update(overrides)
  return parallel.create_mesh(mesh_config, devices)


def check_rows(mesh, batch_size: int) -> dict[int, np.ndarray]:
  """Asserts the row properties for every process of `mesh`; returns {process: rows}."""
  index_map = parallel.batch_sharding(mesh).devices_indices_map((batch_size,))
  by_process = collections.defaultdict(list)
  for device, index in index_map.items():
    by_process[device.process_index].append((device, range(*index[0].indices(batch_size))))
  rows = {p: parallel.batch_rows(mesh, batch_size, p) for p in by_process}
  fed = np.zeros(batch_size, int)
  for p, held in by_process.items():
    mine = rows[p]
    assert len(set(mine.tolist())) == len(mine) and np.all(np.diff(mine) > 0)  # each once
    assert set(mine.tolist()) == set().union(*(set(r) for _, r in held))  # exactly its chips'
    # jax maps the sorted distinct shards of a process to consecutive slices of its local
    # data: each device's rows must be a contiguous run of `mine`, in order.
    position = {row: i for i, row in enumerate(mine.tolist())}
    for _, r in held:
      local = [position[row] for row in r]
      assert local == list(range(local[0], local[0] + len(r)))
    fed[mine] += 1
  assert np.all(fed >= 1), "rows no process feeds"
  # Processes that share a shard feed it from the same global rows (so identical examples:
  # an example depends on its global row only, test_shared_rows_load_identical_examples).
  shard_owners = collections.defaultdict(set)
  for p, held in by_process.items():
    for _, r in held:
      shard_owners[(r.start, r.stop)].add(p)
  for (start, stop), owners in shard_owners.items():
    for p in owners:
      assert set(range(start, stop)) <= set(rows[p].tolist())
  return rows


@pytest.mark.parametrize("slice_name", SLICES)
def test_every_layout_on_every_slice_feeds_each_row_from_the_hosts_that_hold_it(slice_name):
  spec = tpu_slices.parse(slice_name)
  devices = tpu_slices.compile_only_devices(spec)
  hosts = {d.process_index for d in devices}
  assert len(hosts) == spec.hosts, (slice_name, len(hosts), spec.hosts)
  per_host = collections.Counter(d.process_index for d in devices)
  assert set(per_host.values()) == {spec.chips // spec.hosts}
  checked = 0
  for name, overrides in LAYOUTS:
    if spec.chips < overrides.get("tensor", 1):
      continue  # tensor=4 needs 4 chips
    config = _config(name)
    mesh = _mesh(config, overrides, devices)
    for batch in (config.batch_size, config.eval_batch_size):
      if batch % parallel.data_parallel_size(mesh) == 0:  # else refused at start, with the fix
        check_rows(mesh, batch)
    checked += 1
  assert checked >= 4, slice_name


@pytest.mark.parametrize("slice_name,num_slices", MULTI_SLICE)
def test_multi_slice_layouts_feed_each_row_from_the_hosts_that_hold_it(slice_name, num_slices):
  spec = tpu_slices.parse(slice_name)
  devices = tpu_slices.compile_only_devices(spec, num_slices)
  assert len({d.process_index for d in devices}) == spec.hosts * num_slices
  for name, overrides in MULTI_SLICE_LAYOUTS:
    config = _config(name)
    check_rows(_mesh(config, overrides, devices), config.batch_size)


def test_vim_large_tensor4_on_a_v4_128_feeds_shared_rows_not_contiguous_slices(capsys):
  """The issue's layout: every tensor group spans 2 hosts; each host holds 2 fsdp rows."""
  spec = tpu_slices.parse("v4-128")
  devices = tpu_slices.compile_only_devices(spec)
  config = _config("vim_large.py")
  mesh = _mesh(config, {"data": 1, "fsdp": -1, "tensor": 4}, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 4}
  spans = {len({d.process_index for d in mesh.devices[0, row]}) for row in range(16)}
  assert spans == {2}  # every tensor group on 2 hosts
  rows = check_rows(mesh, config.batch_size)
  batch, processes = config.batch_size, spec.hosts
  contiguous = {
      p: np.arange(p * batch // processes, (p + 1) * batch // processes) for p in range(processes)
  }
  with capsys.disabled():
    print(f"\nVIM-Large tensor=4 on a v4-128, batch {batch}, rows per process (first 4):")
    for p in range(4):
      before, now = (pipeline.describe_rows(r) for r in (contiguous[p], rows[p]))
      print(
          f"  process {p}: before {before} ({len(contiguous[p])} rows); "
          f"now {now} ({len(rows[p])} rows)"
      )
  assert all(len(r) == 2 * batch // 16 for r in rows.values())  # 2 fsdp rows of 64 each
  assert any(not np.array_equal(rows[p], contiguous[p]) for p in rows)
  sharing = collections.Counter(tuple(r.tolist()) for r in rows.values())
  assert set(sharing.values()) == {2}  # each set of rows fed by exactly 2 hosts


def test_shared_rows_load_identical_examples():
  """Two processes holding the same rows (a tensor group on 2 hosts) load the same examples
  with the same augmentation; the others' rows differ."""
  source = sources.ShapesSource("train", 64, 16, seed=1)
  rows_a = np.array([0, 1, 2, 3, 8, 9, 10, 11])
  rows_b = rows_a.copy()
  rows_c = np.array([4, 5, 6, 7, 12, 13, 14, 15])
  loaded = [
      pipeline.InputPipeline(source, 16, 16, seed=3, train=True, rows=r, num_workers=2).local_batch(
          5
      )
      for r in (rows_a, rows_b, rows_c)
  ]
  whole = pipeline.InputPipeline(source, 16, 16, seed=3, train=True).local_batch(5)
  np.testing.assert_array_equal(loaded[0]["image"], loaded[1]["image"])
  np.testing.assert_array_equal(loaded[0]["image"], whole["image"][rows_a])
  np.testing.assert_array_equal(loaded[2]["image"], whole["image"][rows_c])
  np.testing.assert_array_equal(loaded[2]["label"], whole["label"][rows_c])
