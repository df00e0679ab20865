"""The device mesh (axes data, fsdp, tensor) from `config.mesh`.

Sizes are given separately for the links inside a slice (ICI) and across
slices (DCN); a mesh axis is their product. One ICI size and one DCN size
may be -1, which takes the devices (slices) that are left.
"""

import math
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metis_jax.parallel import sharding

AXES = sharding.MESH_AXES  # ("data", "fsdp", "tensor")
# Mesh axes over which the batch is split (the logical `activation_batch`).
BATCH_AXES = ("data", "fsdp")


def resolve_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces one -1 in `sizes` so that their product is `total`.

  Args:
    sizes: one size per mesh axis; at most one is -1.
    total: the number of devices (or slices) to cover.
    what: name used in error messages ("ICI", "DCN").

  Returns:
    The sizes with the -1 filled in.
  """
  sizes = [int(s) for s in sizes]
  if sizes.count(-1) > 1:
    raise ValueError(f"{what} mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{what} mesh {dict(zip(AXES, sizes))}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f"{what} mesh {dict(zip(AXES, sizes))}: {total} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"{what} mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices, "
                     f"but {total} are available; set one axis to -1 or fix the sizes")
  return tuple(sizes)


def num_slices(devices: Sequence) -> int:
  """Number of distinct TPU slices (1 on CPU/GPU or a single slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_shapes(cfg: ml_collections.ConfigDict, num_devices: int,
                slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ICI shape, DCN shape) for `num_devices` devices in `slices` slices."""
  if num_devices % slices:
    raise ValueError(f"{num_devices} devices do not split into {slices} equal slices")
  dcn = resolve_sizes((cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor), slices, "DCN")
  ici = resolve_sizes((cfg.data, cfg.fsdp, cfg.tensor), num_devices // slices, "ICI")
  return ici, dcn


def create_mesh(cfg: ml_collections.ConfigDict, devices: Optional[Sequence] = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; devices default to all of `jax.devices()`.

  Multi-slice TPU jobs (devices with several `slice_index` values) get a
  hybrid mesh whose DCN part crosses slices; everything else an ICI mesh
  laid out along the physical topology where JAX knows it.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  ici, dcn = mesh_shapes(cfg, len(devices), slices)
  if slices > 1:
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, allow_split_physical_axes=cfg.allow_split_physical_axes)
  else:
    shape = tuple(i * d for i, d in zip(ici, dcn))
    try:
      array = mesh_utils.create_device_mesh(
          shape, devices, allow_split_physical_axes=cfg.allow_split_physical_axes)
    except (NotImplementedError, ValueError, AssertionError) as e:
      if devices[0].platform == "tpu":
        raise ValueError(f"mesh {dict(zip(AXES, shape))} does not fit the TPU topology; try "
                         f"`--config.mesh.allow_split_physical_axes=True` ({e})") from e
      array = np.asarray(devices).reshape(shape)
  return Mesh(array, AXES)


def logical_rules(config: ml_collections.ConfigDict) -> tuple:
  """The logical axis rules of `config.mesh` as the tuple flax wants."""
  return sharding.rules_from_config(config.mesh.logical_axis_rules)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` input array: batch over data x fsdp (those in `mesh`).

  The one batch sharding of the package (the input pipelines, the train
  steps); a mesh without those axes (e.g. a bare ('data',) mesh of a
  benchmark) splits over the ones it has, or replicates.
  """
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
  """'data=2 fsdp=2 tensor=2 (8 devices, TPU v5)'."""
  axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return f"{axes} ({mesh.devices.size} devices, {mesh.devices.flat[0].device_kind})"
