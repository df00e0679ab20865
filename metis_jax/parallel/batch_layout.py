"""Inference batches laid out over a device mesh and over processes.

A global batch of B rows is split over the mesh's batch axes (data x fsdp,
D ways): each device holds B / D rows. In a multi-process job each process
holds the rows of its own devices, B / P of them, fills them with its own
examples and reads back only those, so examples never travel between hosts:

  layout = BatchLayout(make_mesh())        # all devices, data parallel
  rows = layout.round_rows(batch_size)     # B: a multiple of D
  fn = layout.jit(f, param_shardings, 2)   # f(params, x, y) -> batch outputs
  params = layout.put_params(params, param_shardings)
  out = layout.get(fn(params, layout.put(x_local), layout.put(y_local)))

`put` takes this process's `[B / P, ...]` rows (numpy), `get` returns them.
With several processes every process must call the same jitted functions on
the same shapes in the same order; `agree` and `allgather` (small host
all-gathers) are how they settle shapes and exchange results.

Parameters are replicated unless the mesh splits them (fsdp or tensor > 1,
by the logical-axis rules, as in training). With replicated parameters `jit`
runs `f` per device under `shard_map`: each device processes its rows as a
batch of its own, with no communication at all (GSPMD would add all-gathers
and all-to-alls around the two guidance passes), and
a row's result is what one device with that batch gives. Otherwise `f` is
one GSPMD program traced under the rules.
"""

import json
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metis_jax import config_base
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.parallel import sharding

BATCH_AXES = mesh_lib.BATCH_AXES


def select_devices(devices_per_process: int = 0, devices: Optional[Sequence] = None) -> list:
  """All `devices` (default `jax.devices()`), or the first `devices_per_process` of each process."""
  devices = list(jax.devices() if devices is None else devices)
  if devices_per_process <= 0:
    return devices
  by_process: dict = {}
  for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  for p, ds in by_process.items():
    if len(ds) < devices_per_process:
      raise ValueError(f"process {p} has {len(ds)} devices, fewer than the {devices_per_process} asked for")
  return [d for ds in by_process.values() for d in ds[:devices_per_process]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence] = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1."""
  cfg = config_base.mesh_config()
  cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
  return mesh_lib.create_mesh(cfg, devices)


class BatchLayout:
  """How batches and parameters sit on `mesh` (see the module docstring).

  Attributes:
    mesh: the device mesh.
    rules: logical-axis rules for sharded parameters and activations.
    shards: ways the batch is split (data x fsdp).
    process_count: processes holding devices of the mesh.
    process_rank: this process's position among them (its rows come in
      that order in the global batch).
  """

  def __init__(self, mesh: Mesh, rules: Sequence = sharding.DEFAULT_RULES):
    self.mesh, self.rules = mesh, tuple(rules)
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.shards = mesh_lib.data_parallel_size(mesh)
    processes = sorted({d.process_index for d in mesh.devices.flat})
    if jax.process_index() not in processes:
      raise ValueError(f"process {jax.process_index()} has no device in the mesh")
    self.process_count = len(processes)
    self.process_rank = processes.index(jax.process_index())
    if self.process_count > 1 and self.process_count != jax.process_count():
      raise ValueError(f"the mesh spans {self.process_count} of {jax.process_count()} processes: "
                       "use all of them or one")
    self._check_rows_per_process()

  @classmethod
  def local(cls, num_devices: int = 0) -> "BatchLayout":
    """Data parallel over this process's devices (all, or the first `num_devices`)."""
    devices = jax.local_devices()
    return cls(make_mesh(devices=devices[:num_devices] if num_devices > 0 else devices))

  @property
  def multiprocess(self) -> bool:
    return self.process_count > 1

  def _check_rows_per_process(self) -> None:
    """Every block of rows lives on one process, and each process holds as many blocks."""
    owners: dict = {}
    for device, index in self.batch_sharding.devices_indices_map((self.shards,)).items():
      owners.setdefault(index[0].start or 0, set()).add(device.process_index)
    if any(len(p) > 1 for p in owners.values()):
      raise ValueError(f"mesh {dict(self.mesh.shape)}: the same batch rows would live on several "
                       "processes; keep the fsdp and tensor axes inside a process")
    counts = [sum(1 for p in owners.values() if q in p) for q in sorted({d.process_index for d in
                                                                         self.mesh.devices.flat})]
    if len(set(counts)) > 1:
      raise ValueError(f"mesh {dict(self.mesh.shape)}: processes hold unequal shares of the batch {counts}")

  def describe(self) -> str:
    processes = f", {self.process_count} processes" if self.multiprocess else ""
    return mesh_lib.describe(self.mesh) + processes

  # ------------------------------------------------------------------ rows

  def round_rows(self, rows: int) -> int:
    """The global batch for `rows` examples: rounded up to a multiple of the batch shards."""
    return max(1, math.ceil(rows / self.shards)) * self.shards

  def local_rows(self, global_rows: int) -> int:
    """Rows of a global batch that this process fills."""
    return global_rows // self.process_count

  def put(self, local: np.ndarray) -> jax.Array:
    """This process's rows `[B / P, ...]` -> the global batch `[B, ...]`, sharded on axis 0."""
    local = np.asarray(local)
    global_shape = (local.shape[0] * self.process_count,) + local.shape[1:]
    return jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)

  def get(self, x: jax.Array) -> np.ndarray:
    """A batch-sharded global array -> this process's rows (numpy, in `put` order)."""
    if x.is_fully_addressable:
      return np.asarray(x)
    blocks = {}
    for shard in x.addressable_shards:
      blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])

  # ------------------------------------------------------------------ parameters

  def param_shardings(self, module=None, params=None):
    """Shardings of `params` (a pytree): by the logical rules when the mesh splits parameters and
    `module` (a flax module with `init_inputs`) names their axes, else replicated."""
    replicated = jax.tree.map(lambda _: self.replicated, params)
    if module is None or not hasattr(module, "init_inputs") or (
        self.mesh.shape["fsdp"] == 1 and self.mesh.shape["tensor"] == 1):
      return replicated
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.init_inputs())["params"])
    specs = nn.get_partition_spec(boxed)
    try:
      return jax.tree.map(lambda spec, _: nn.logical_to_mesh_sharding(spec, self.mesh, self.rules),
                          specs, params, is_leaf=lambda x: isinstance(x, PartitionSpec))
    except ValueError:  # parameters that do not match the module's tree: replicate them
      return replicated

  def put_params(self, params, shardings=None):
    """Places a pytree of host arrays (the same on every process) on the mesh."""
    if shardings is None:
      shardings = jax.tree.map(lambda _: self.replicated, params)

    def place(x, s):
      x = np.asarray(x)
      if not self.multiprocess:
        return jax.device_put(x, s)
      return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(place, params, shardings)

  # ------------------------------------------------------------------ functions

  def jit(self, fn: Callable, param_shardings, num_batch_args: int) -> Callable:
    """`jax.jit(fn)` with explicit shardings, for fn(params, *batch) -> pytree of batch outputs.

    Every batch argument and output is `[B, ...]`, sharded on axis 0;
    `params` are laid out by `param_shardings`.
    """
    in_shardings = (param_shardings,) + (self.batch_sharding,) * num_batch_args
    leaves = jax.tree.leaves(param_shardings)
    if all(s.is_fully_replicated for s in leaves):
      rows = PartitionSpec(BATCH_AXES)
      body = jax.shard_map(fn, mesh=self.mesh, in_specs=(PartitionSpec(),) + (rows,) * num_batch_args,
                           out_specs=rows, check_vma=False)
      return jax.jit(body, in_shardings=in_shardings, out_shardings=self.batch_sharding)
    mesh, rules = self.mesh, self.rules

    def traced(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        return fn(*args)

    return jax.jit(traced, in_shardings=in_shardings, out_shardings=self.batch_sharding)

  # ------------------------------------------------------------------ host collectives

  def allgather(self, x) -> np.ndarray:
    """`[P, ...]`: `x` (int32 / float32 / uint8, same shape everywhere) from every process."""
    x = np.asarray(x)
    if not self.multiprocess:
      return x[None]
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x))

  def agree(self, table: Sequence[Sequence[int]], width: int) -> list[np.ndarray]:
    """Every process's rows of small integers (`[n_p, width]`, n_p may differ) -> a list of
    `[n_p, width]` int arrays, one per process (a barrier when there are several)."""
    table = np.asarray(table, np.int32).reshape(-1, width)
    counts = self.allgather(np.asarray([len(table)], np.int32))[:, 0]
    padded = np.zeros((int(counts.max(initial=0)), width), np.int32)
    padded[:len(table)] = table
    every = self.allgather(padded)
    return [every[p, :counts[p]] for p in range(len(counts))]

  def allgather_json(self, value) -> list:
    """A JSON-able value from every process, in process order."""
    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    sizes = self.allgather(np.asarray([len(data)], np.int32))[:, 0]
    padded = np.zeros((int(sizes.max(initial=0)),), np.uint8)
    padded[:len(data)] = data
    every = self.allgather(padded)
    return [json.loads(every[p, :sizes[p]].tobytes().decode("utf-8")) for p in range(len(sizes))]
