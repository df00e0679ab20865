"""The one batch path: Grain source chain -> host iterator -> global `jax.Array` batches.

Every trainer's input (token batches of `data.pipeline`, audio crops of
`data.waveform_pipeline`, the synthetic batches of `training.input_pipeline`)
goes through this module:

  `source_chain`      random-access sources, one per corpus
                        -> shuffle(seed + 7919 i)   global shuffle, re-seeded every epoch
                        -> per-source map           (optional, lazy, order unchanged)
                        -> repeat(num_epochs)       0 = forever
                        -> mix(weights)             several corpora in fixed proportions
                        -> [process_index::process_count]   disjoint slice per JAX process
  (the caller's element-level maps: decode, crop, load audio)
  `host_iter_dataset` -> to_iter_dataset -> mp_prefetch(num_workers)   (0 = no worker processes)
  (the caller's batching: length buckets, packing, crop stacking)
  `GlobalBatchIterator`  host numpy batches `{name: [b, ...]}` -> global
                        `jax.Array`s `[process_count * b, ...]` split over
                        the mesh's batch axes (`parallel.mesh.batch_sharding`).

Nothing here talks to the other hosts: every host's batch already has the
global batch's shape (bucket lengths come from a schedule all hosts compute
alike, see `data.bucketing`), so assembly is `make_array_from_process_local_data`.

The global iterator's state is the host iterator's, as JSON bytes (what the
trainer's Grain/Orbax checkpoint item stores, one file per process); the keys
are the host iterator's own, so checkpoints of earlier versions read back.

JAX is imported lazily: Grain worker processes unpickle the transforms of
`data.pipeline` and must not pay for it.
"""

import json
from typing import Any, Callable, Iterator, Optional, Sequence

import grain
import numpy as np

# Seed offset between corpora, so two corpora never share a shuffle.
SOURCE_SEED_STRIDE = 7919


def check_slice(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")


def source_chain(sources: Sequence[Any], weights: Sequence[float] = (), *, seed: int = 0,
                 num_epochs: int = 0, process_index: int = 0, process_count: int = 1,
                 per_source: Optional[Callable[[int, grain.MapDataset], grain.MapDataset]] = None
                 ) -> grain.MapDataset:
  """This process's slice of the shuffled, repeated mixture of `sources`.

  Args:
    sources: random-access sources (len, getitem), one per corpus.
    weights: mixture weights, one per source (empty = equal).
    seed: shuffle seed; source i shuffles with seed + 7919 i.
    num_epochs: passes over each source; 0 = forever.
    process_index: this process's slice.
    process_count: number of slices; element k of the mixture goes to
      process k mod process_count, so slices are disjoint and together
      complete.
    per_source: `f(i, ds) -> ds`, an element-wise map applied to source i
      after its shuffle (e.g. decoding, so that errors can name the corpus).

  Returns:
    A `grain.MapDataset` of the raw (or mapped) elements.
  """
  if weights and len(weights) != len(sources):
    raise ValueError(f"{len(weights)} mixture weights for {len(sources)} sources")
  check_slice(process_index, process_count)
  parts = []
  for i, src in enumerate(sources):
    ds = grain.MapDataset.source(src).shuffle(seed=seed + SOURCE_SEED_STRIDE * i)
    if per_source is not None:
      ds = per_source(i, ds)
    parts.append(ds.repeat(num_epochs if num_epochs > 0 else None))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights) or None)
  return ds[process_index::process_count]


def allow_unparsed_absl_flags() -> None:
  """mp_prefetch reads an absl flag; outside absl.app (scripts, pytest) mark flags parsed.

  Grain 0.2.x raises UnparsedFlagAccessError otherwise (google/grain#1355,
  fixed upstream by falling back to the flag's default, which is what this does).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def host_iter_dataset(ds: grain.MapDataset, read_options: grain.ReadOptions, num_workers: int = 0,
                      worker_buffer_size: int = 1) -> grain.IterDataset:
  """`ds` as an IterDataset read by `read_options` threads and `num_workers` processes (0 = none)."""
  it = ds.to_iter_dataset(read_options)
  if num_workers > 0:
    allow_unparsed_absl_flags()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                      per_worker_buffer_size=worker_buffer_size))
  return it


def _sharding_for(sharding, ndim: int):
  """A Mesh gives `batch_sharding(mesh, ndim)`; a Sharding is used as is."""
  import jax  # pylint: disable=import-outside-toplevel
  if isinstance(sharding, jax.sharding.Mesh):
    from metis_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    return mesh_lib.batch_sharding(sharding, ndim)
  return sharding


def make_global_batch(batch: dict[str, Any], sharding, global_batch: Optional[int] = None) -> dict[str, Any]:
  """Host-local numpy batch -> dict of global `jax.Array`s split over the batch axis.

  Args:
    batch: `{name: [b, ...]}` numpy arrays, b = global_batch / process_count
      rows, the same shapes on every process; non-array entries (e.g. 'ids')
      are dropped.
    sharding: a `jax.sharding.Mesh` (each array gets
      `parallel.mesh.batch_sharding(mesh, ndim)`) or one sharding whose spec
      splits axis 0 (used for every array).
    global_batch: rows of the global batch (default b * jax.process_count()).

  Returns:
    The same names as `jax.Array`s of shape `[global_batch, ...]`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  out = {}
  for name, value in batch.items():
    if not isinstance(value, np.ndarray):
      continue
    rows = global_batch or value.shape[0] * jax.process_count()
    out[name] = jax.make_array_from_process_local_data(_sharding_for(sharding, value.ndim), value,
                                                       (rows,) + value.shape[1:])
  return out


class GlobalBatchIterator:
  """Turns a host-batch iterator into global `jax.Array` batches (see `make_global_batch`).

  Args:
    local: iterator of `{name: [b, ...]}` numpy dicts with `get_state()` /
      `set_state()` (a dict, as Grain iterators have, or bytes).
    sharding: a `Mesh` or a batch sharding (see `make_global_batch`).
    global_batch: rows of the global batch (default b * process count).

  `get_state()` is JSON bytes of the host iterator's state (Grain's Orbax
  handler stores them in process_<i>-of-<n>.json); `set_state` takes those
  bytes or the dict itself.
  """

  def __init__(self, local: Iterator, sharding, global_batch: Optional[int] = None):
    self.local, self.sharding, self.global_batch = local, sharding, global_batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    return make_global_batch(next(self.local), self.sharding, self.global_batch)

  def get_state(self) -> bytes:
    state = self.local.get_state()
    return state if isinstance(state, bytes) else json.dumps(state, indent=2).encode()

  def set_state(self, state) -> None:
    local_is_bytes = isinstance(self.local.get_state(), bytes)
    if isinstance(state, (bytes, bytearray)) and not local_is_bytes:
      state = json.loads(bytes(state).decode())
    elif not isinstance(state, (bytes, bytearray)) and local_is_bytes:
      state = json.dumps(state, indent=2).encode()
    self.local.set_state(state)

  def start_prefetch(self) -> None:
    if hasattr(self.local, "start_prefetch"):
      self.local.start_prefetch()

  def close(self) -> None:
    if hasattr(self.local, "close"):
      self.local.close()
