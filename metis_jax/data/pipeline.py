"""The Grain training input pipeline: tokenized shards -> global jax.Array batches.

Per host (JAX process), with the Grain Dataset API:

  ArrayRecordDataSource (or tfds.data_source) per corpus
    -> shuffle(seed)                 global shuffle, re-seeded every epoch
    -> repeat(num_epochs)            0 = forever
    -> mix(weights)                  several corpora in fixed proportions
    -> [process_index::process_count]   disjoint slice per JAX process
    -> decode                        record bytes -> int32 tokens [T] (+ acoustic [T, Q])
    -> random crop to max_length, drop if shorter than min_length
    -> to_iter_dataset -> mp_prefetch(num_workers)   (0 = no worker processes)
    -> length-bucketed batching (or packing)    host batches of few shapes
    -> global jax.Array batches for the caller's mesh sharding

Batch format (what the trainer reads), host-local numpy or global jax.Array:
  tokens       int32 [batch, time]  token ids, 0 at padding.
  valid        bool  [batch, time]  True at real tokens (a prefix of each row).
  segment_ids  int32 [batch, time]  only with packing: 1, 2, ... per packed
                                    sequence, 0 at padding.
  positions    int32 [batch, time]  only with packing: position within its
                                    sequence (0 at padding).
  acoustic_tokens int32 [batch, time, Q]  only for S2A (`acoustic_layers` = Q > 0):
                                    the first Q codec layers of each frame,
                                    aligned with `tokens` (see `align_streams`),
                                    0 at padding.

Bucketing: elements are read in windows of `bucket_window` batches, sorted by
length, cut into batches, and each batch is padded to the smallest of
`bucket_lengths` that fits; the batches of a window are emitted in a seeded
random order. With several JAX processes, hosts agree on the padded length of
each step (a one-integer all-gather) so the global array has one shape.
Packing (`config.data.packing`) gives a fixed [batch, max_length] instead.

Entry points: `make_local_iterator(config)` (host numpy batches, for a caller
that assembles global arrays itself, like metis_jax.input_pipeline) and
`make_train_iterator(config, sharding)` (global jax.Arrays). With bucketing,
T takes one of the `bucket_lengths` values (set `config.data.bucket_lengths =
(seq_length,)` for a single shape); with packing T = seq_length.

Checkpointing: the iterator is a `grain.DatasetIterator`; its state (a few
hundred bytes of JSON per host) is saved with Orbax through
`grain.checkpoint.CheckpointHandler` (see `checkpoint_args`,
`save_iterator`, `restore_iterator`). A restored iterator yields exactly the
batches the uninterrupted one would have (same sources, seeds and worker
count).
"""

import math
import os
from typing import Any, Optional, Sequence

import grain
import numpy as np

from metis_jax.data import records
from metis_jax.data import shards

# Threads reading records inside each worker (or the main process).
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)


# ---------------------------------------------------------------------------
# Sources and per-element transforms (run in the Grain worker processes).


def open_source(spec: str, tfds_data_dir: str = ""):
  """A random-access data source for one corpus.

  Args:
    spec: a folder of `*.array_record` shards, a glob, one shard file, or
      'tfds:NAME[:SPLIT]' (a TFDS dataset built in ArrayRecord format).
    tfds_data_dir: TFDS data_dir for 'tfds:' specs ('' = TFDS default).

  Returns:
    A `grain.sources.RandomAccessDataSource`-like object (len, getitem).
  """
  if spec.startswith("tfds:"):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"source {spec!r} needs tensorflow_datasets: pip install 'metis_jax[tfds]'") from e
    name, _, split = spec[len("tfds:"):].partition(":")
    return tfds.data_source(name, split=split or "train", data_dir=tfds_data_dir or None)
  return grain.sources.ArrayRecordDataSource(shards.list_shards(spec))


def align_streams(ssl_tokens: np.ndarray, acoustic_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cuts SSL tokens `[T]` and acoustic tokens `[Ta, Q]` to the shorter of the two.

  The streams disagree by about one frame: SSL tokens come from 16 kHz fbank
  frames, ceil((floor((N - 400) / 160) + 1) / 2) of them (149 for 3 s), codec
  tokens from 24 kHz / 480 (150 for 3 s). As `generation.py` does for the
  prompt, both are cut to the shorter one (usually dropping the last 20 ms
  codec frame), so frame i of the acoustic stream sits on SSL token i.
  """
  n = min(len(ssl_tokens), len(acoustic_tokens))
  return ssl_tokens[:n], acoustic_tokens[:n]


class MissingAcousticTokens(ValueError):
  """A record read for S2A training has no acoustic tokens (or too few layers)."""


def _acoustic(rid: str, acoustic, acoustic_layers: int, source: str) -> np.ndarray:
  """The first `acoustic_layers` codec layers of a record as int32 `[Ta, Q]`, or a clear error."""
  if acoustic is None:
    raise MissingAcousticTokens(
        f"record {rid!r} of source {source!r} has no acoustic tokens: S2A training "
        "(model.kind='s2a') needs shards written by `python -m metis_jax.data.tokenize` with "
        "--config.data.acoustic_codec_encoder/decoder set (or the demo corpus of an S2A config)")
  acoustic = np.asarray(acoustic)
  if acoustic.ndim != 2 or acoustic.shape[1] < acoustic_layers:
    raise MissingAcousticTokens(
        f"record {rid!r} of source {source!r} has acoustic tokens of shape {acoustic.shape}; the "
        f"model embeds {acoustic_layers} codec layers (model.num_quantizers)")
  return acoustic[:, :acoustic_layers].astype(np.int32)


def decode_element(raw, keep_id: bool = False, acoustic_layers: int = 0, source: str = "") -> dict[str, Any]:
  """Record bytes (or a TFDS example dict) -> {'tokens': int32 [T]} (+ 'id').

  With `acoustic_layers` = Q > 0 (S2A) the element also has
  'acoustic_tokens' int32 [T, Q], both streams cut to the shorter one
  (`align_streams`); a record without acoustic tokens raises
  `MissingAcousticTokens` naming the record and its `source`.
  """
  if isinstance(raw, (bytes, bytearray)):
    if not keep_id and not acoustic_layers:
      return {"tokens": records.ssl_tokens_only(raw)}
    rec = records.decode(raw)
    rid, acoustic = rec["id"], rec.get("acoustic_tokens")
  else:
    rec, acoustic = raw, (raw.get("acoustic_tokens") if hasattr(raw, "get") else None)
    rid = raw["id"] if keep_id or acoustic_layers else ""
    rid = rid.decode() if isinstance(rid, bytes) else str(rid)
  out = {"tokens": np.asarray(rec["ssl_tokens"]).astype(np.int32)}
  if acoustic_layers:
    out["tokens"], out["acoustic_tokens"] = align_streams(
        out["tokens"], _acoustic(rid, acoustic, acoustic_layers, source))
  if keep_id:
    out["id"] = rid
  return out


def check_acoustic(src, spec: str, acoustic_layers: int) -> None:
  """Fails early (in the main process) when the first record of a source lacks acoustic tokens."""
  decode_element(src[0], acoustic_layers=acoustic_layers, source=spec)


class RandomCrop(grain.transforms.RandomMap):
  """Crops 'tokens' (and 'acoustic_tokens', at the same offset) to at most `max_length`."""

  def __init__(self, max_length: int):
    self.max_length = max_length

  def random_map(self, element, rng: np.random.Generator):
    tokens = element["tokens"]
    if len(tokens) > self.max_length:
      start = int(rng.integers(0, len(tokens) - self.max_length + 1))
      cut = slice(start, start + self.max_length)
      element = dict(element, tokens=tokens[cut])
      if "acoustic_tokens" in element:
        element["acoustic_tokens"] = element["acoustic_tokens"][cut]
    return element


class MinLength(grain.transforms.Filter):
  """Keeps elements with at least `min_length` tokens."""

  def __init__(self, min_length: int):
    self.min_length = min_length

  def filter(self, element) -> bool:
    return len(element["tokens"]) >= self.min_length


class _Decode(grain.transforms.Map):

  def __init__(self, keep_id: bool, acoustic_layers: int = 0, source: str = ""):
    self.keep_id, self.acoustic_layers, self.source = keep_id, acoustic_layers, source

  def map(self, element):
    return decode_element(element, self.keep_id, self.acoustic_layers, self.source)


def element_dataset(sources: Sequence[str], weights: Sequence[float] = (), *, max_length: int,
                    min_length: int = 1, seed: int = 0, num_epochs: int = 0, process_index: int = 0,
                    process_count: int = 1, tfds_data_dir: str = "", keep_ids: bool = False,
                    acoustic_layers: int = 0) -> grain.MapDataset:
  """The per-host dataset of cropped token sequences, before batching.

  Args:
    sources: corpus specs (see `open_source`).
    weights: mixture weights, one per source (empty = equal).
    max_length: crop length in tokens.
    min_length: shorter sequences are dropped (they appear as None).
    seed: seed of the shuffle and the crops.
    num_epochs: passes over each corpus; 0 = forever.
    process_index: this host's slice.
    process_count: number of slices.
    tfds_data_dir: for 'tfds:' sources.
    keep_ids: also emit the record id (tests and debugging).
    acoustic_layers: Q > 0 also emits 'acoustic_tokens' int32 [T, Q] (S2A);
      every source must carry them (checked on its first record here, and on
      every record when decoded).

  Returns:
    A `grain.MapDataset` of {'tokens': int32 [T]} (+ 'acoustic_tokens', 'id'),
    T <= max_length.
  """
  if not sources:
    raise ValueError("no training sources: set config.data.train_sources")
  if weights and len(weights) != len(sources):
    raise ValueError(f"{len(weights)} mixture weights for {len(sources)} sources")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  parts = []
  for i, spec in enumerate(sources):
    src = open_source(spec, tfds_data_dir)
    if len(src) == 0:
      raise ValueError(f"source {spec!r} has no records")
    if acoustic_layers:
      check_acoustic(src, spec, acoustic_layers)
    ds = grain.MapDataset.source(src).shuffle(seed=seed + 7919 * i)
    # Decoding per source (lazy, element-wise: the order is unchanged) lets
    # an error name the corpus the record came from.
    ds = ds.map(_Decode(keep_ids, acoustic_layers, spec))
    parts.append(ds.repeat(num_epochs if num_epochs > 0 else None))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights) or None)
  ds = ds[process_index::process_count]
  ds = ds.random_map(RandomCrop(max_length), seed=seed + 1)
  return ds.filter(MinLength(min_length))


# ---------------------------------------------------------------------------
# Length-bucketed batching.


def default_buckets(max_length: int, num: int = 4) -> tuple[int, ...]:
  """`num` equal steps up to max_length: 1024 -> (256, 512, 768, 1024)."""
  return tuple(sorted({max(1, math.ceil(max_length * (i + 1) / num)) for i in range(num)}))


def check_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
  buckets = tuple(int(b) for b in buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
    raise ValueError(f"bucket_lengths {buckets} must be increasing positive integers")
  if buckets[-1] != max_length:
    raise ValueError(f"the last bucket length {buckets[-1]} must equal the crop length {max_length}")
  return buckets


def pad_batch(seqs: Sequence[np.ndarray], batch_size: int, length: int,
              acoustic: Optional[Sequence[np.ndarray]] = None) -> dict[str, np.ndarray]:
  """Pads sequences into {'tokens' int32 [batch_size, length], 'valid' bool [...]}.

  Rows beyond len(seqs) are all padding (valid False). `acoustic` (one
  `[T_i, Q]` array per sequence, T_i = len(seqs[i])) adds 'acoustic_tokens'
  int32 [batch_size, length, Q].
  """
  tokens = np.zeros((batch_size, length), np.int32)
  valid = np.zeros((batch_size, length), bool)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
    valid[r, :len(s)] = True
  out = {"tokens": tokens, "valid": valid}
  if acoustic is not None:
    codes = np.zeros((batch_size, length, acoustic[0].shape[1]), np.int32)
    for r, a in enumerate(acoustic):
      codes[r, :len(a)] = a
    out["acoustic_tokens"] = codes
  return out


class BucketBatchIterDataset(grain.IterDataset):
  """Sorts windows of elements by length and pads batches to bucket lengths."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: Sequence[int],
               window: int = 32, seed: int = 0, keep_ids: bool = False):
    super().__init__(parent)
    self.batch_size = batch_size
    self.buckets = tuple(buckets)
    self.window = max(1, window)
    self.seed = seed
    self.keep_ids = keep_ids

  def __iter__(self) -> "BucketBatchIterator":
    return BucketBatchIterator(self._parent.__iter__(), self)

  def __str__(self):
    return f"BucketBatchIterDataset(batch_size={self.batch_size}, buckets={self.buckets}, window={self.window})"


class BucketBatchIterator(grain.DatasetIterator):
  """Iterator of `BucketBatchIterDataset`.

  State: the parent's state at the start of the current window, the window's
  number and how many of its batches were emitted. Restoring re-reads that
  window from the parent (deterministic) and skips the emitted batches.
  """

  def __init__(self, parent: grain.DatasetIterator, ds: BucketBatchIterDataset):
    super().__init__(parent)
    self._ds = ds
    self._window_start = parent.get_state()
    self._window_index = 0
    self._batches: Optional[list[dict[str, Any]]] = None
    self._emitted = 0

  def _read_window(self) -> list[dict[str, Any]]:
    ds = self._ds
    elems = []
    for _ in range(ds.window * ds.batch_size):
      try:
        elems.append(next(self._parent))
      except StopIteration:
        break
    if not elems:
      return []
    order = sorted(range(len(elems)), key=lambda i: (len(elems[i]["tokens"]), i))
    groups = [order[s:s + ds.batch_size] for s in range(0, len(order), ds.batch_size)]
    perm = np.random.default_rng([ds.seed, self._window_index]).permutation(len(groups))
    batches = []
    for g in perm:
      seqs = [elems[i]["tokens"] for i in groups[g]]
      longest = max(len(s) for s in seqs)
      length = next((b for b in ds.buckets if b >= longest), None)
      if length is None:
        raise ValueError(f"sequence of {longest} tokens is longer than the largest bucket {ds.buckets[-1]}")
      acoustic = [elems[i]["acoustic_tokens"] for i in groups[g]] if "acoustic_tokens" in elems[0] else None
      batch = pad_batch(seqs, ds.batch_size, length, acoustic)
      if ds.keep_ids:
        batch["ids"] = [elems[i].get("id") for i in groups[g]]
      batches.append(batch)
    return batches

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    if self._batches is not None and self._emitted == len(self._batches):
      self._window_index += 1
      self._batches = None
    if self._batches is None:
      self._window_start = self._parent.get_state()
      self._batches = self._read_window()
      self._emitted = 0
      if not self._batches:
        self._batches = None
        raise StopIteration
    batch = self._batches[self._emitted]
    self._emitted += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._batches is not None and self._emitted == len(self._batches):
      return {"parent": self._parent.get_state(), "window_index": self._window_index + 1, "emitted": 0}
    if self._batches is None:
      return {"parent": self._parent.get_state(), "window_index": self._window_index, "emitted": 0}
    return {"parent": self._window_start, "window_index": self._window_index, "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._window_index = int(state["window_index"])
    self._batches = None
    self._emitted = 0
    if int(state["emitted"]) > 0:
      self._window_start = state["parent"]
      self._batches = self._read_window()
      self._emitted = int(state["emitted"])


def _allow_unparsed_absl_flags() -> None:
  """mp_prefetch reads an absl flag; outside absl.app (scripts, pytest) mark flags parsed.

  Grain 0.2.x raises UnparsedFlagAccessError otherwise (google/grain#1355,
  fixed upstream by falling back to the flag's default, which is what this does).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _packed_to_batch(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg = x["tokens_segment_ids"].astype(np.int32)
  return {"tokens": np.where(seg > 0, x["tokens"], 0).astype(np.int32), "valid": seg > 0,
          "segment_ids": seg, "positions": x["tokens_positions"].astype(np.int32)}


# ---------------------------------------------------------------------------
# Assembly.


def host_batch_dataset(cfg, *, batch_size: int, max_length: int, process_index: int = 0,
                       process_count: int = 1, num_workers: Optional[int] = None,
                       keep_ids: bool = False, acoustic_layers: int = 0) -> grain.IterDataset:
  """The host-local pipeline: an IterDataset of numpy batches (see module doc).

  Args:
    cfg: `config.data`.
    batch_size: rows per host batch (the global batch / process_count).
    max_length: crop length and largest padded length (train.seq_length).
    process_index: this host.
    process_count: number of hosts.
    num_workers: override of cfg.num_workers.
    keep_ids: add 'ids' (list of record ids) to bucketed batches (tests).
    acoustic_layers: Q > 0 adds 'acoustic_tokens' [batch, T, Q] (S2A).
  """
  if cfg.min_length > max_length:
    raise ValueError(f"data.min_length {cfg.min_length} > crop length {max_length}")
  if cfg.packing and acoustic_layers:
    raise ValueError("data.packing is not supported with acoustic tokens (S2A trains on padded batches)")
  elements = element_dataset(
      list(cfg.train_sources), list(cfg.train_weights), max_length=max_length, min_length=cfg.min_length,
      seed=cfg.seed, num_epochs=cfg.num_epochs, process_index=process_index, process_count=process_count,
      tfds_data_dir=cfg.tfds_data_dir, keep_ids=keep_ids, acoustic_layers=acoustic_layers)
  ds = elements.to_iter_dataset(_READ_OPTIONS)
  workers = cfg.num_workers if num_workers is None else num_workers
  if workers > 0:
    _allow_unparsed_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                      per_worker_buffer_size=cfg.worker_buffer_size))
  if cfg.packing:
    ds = grain.experimental.FirstFitPackIterDataset(
        ds.map(lambda x: {"tokens": x["tokens"]}), length_struct={"tokens": max_length},
        num_packing_bins=batch_size, seed=cfg.seed, shuffle_bins=True)
    return ds.batch(batch_size, drop_remainder=True).map(_packed_to_batch)
  buckets = check_buckets(cfg.bucket_lengths or default_buckets(max_length), max_length)
  return BucketBatchIterDataset(ds, batch_size, buckets, cfg.bucket_window, cfg.seed, keep_ids)


def _agree_on_length(length: int) -> int:
  """The largest padded length over all JAX processes (one-integer all-gather)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.asarray(length, np.int32))))


def agree_on_length(batch: dict[str, Any]) -> dict[str, Any]:
  """Pads a host batch to the longest padded length over all JAX processes.

  Bucketed batches differ in length from host to host; a global array needs
  one shape. A no-op with a single process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return batch
  length = batch["tokens"].shape[1]
  target = _agree_on_length(length)
  if target == length:
    return batch
  pad = lambda v: np.pad(v, [(0, 0), (0, target - length)] + [(0, 0)] * (v.ndim - 2))
  return {k: pad(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def make_global_batch(batch: dict[str, np.ndarray], sharding, agree_length: bool = True) -> dict[str, Any]:
  """Host-local numpy batch -> dict of global jax.Arrays sharded over the batch.

  Args:
    batch: {'tokens': [b, T], 'valid': [b, T], ...} with b = global batch /
      process_count rows; non-array entries (e.g. 'ids') are dropped.
    sharding: a `jax.sharding.NamedSharding` whose spec splits axis 0 (e.g.
      `batch_sharding(mesh)`).
    agree_length: with several processes, first pad every host's batch to the
      longest padded length among them (`agree_on_length`); not needed when
      the batches already agree (packing, `make_local_iterator`).

  Returns:
    The same keys as jax.Arrays of global shape [global_batch, T].
  """
  import jax  # pylint: disable=g-import-not-at-top
  if agree_length:
    batch = agree_on_length(batch)
  arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


class AgreedLengthIterator(grain.DatasetIterator):
  """Host batches padded to the same length on every JAX process (`agree_on_length`)."""

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    return agree_on_length(next(self._parent))

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def batch_sharding(mesh, batch_axes: Sequence[str] = ("data", "fsdp")):
  """NamedSharding splitting the batch axis over `batch_axes` of `mesh` (those present)."""
  import jax  # pylint: disable=g-import-not-at-top
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


class GlobalBatchIterator(grain.DatasetIterator):
  """Wraps a host-batch iterator; yields global jax.Array batches.

  Checkpoint state is the wrapped iterator's (so it works with
  `grain.checkpoint.CheckpointHandler`).
  """

  def __init__(self, parent: grain.DatasetIterator, sharding, agree_length: bool = True):
    super().__init__(parent)
    self._sharding = sharding
    self._agree_length = agree_length

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    return make_global_batch(next(self._parent), self._sharding, self._agree_length)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def acoustic_layers(config) -> int:
  """Codec layers the batches of `config` carry: model.num_quantizers for S2A, else 0."""
  model = config.get("model")
  if model is None or model.get("kind", "metis") != "s2a":
    return 0
  return int(model.num_quantizers)


def make_local_iterator(config, process_index: Optional[int] = None, process_count: Optional[int] = None,
                        num_workers: Optional[int] = None) -> grain.DatasetIterator:
  """This host's training batches as numpy arrays (for a caller that builds global arrays).

  Args:
    config: the full config (reads `config.data`, `config.train.global_batch_size`
      and `config.train.seq_length`).
    process_index: this host (default jax.process_index()); passing both
      index and count simulates a slice of a multi-process run.
    process_count: number of hosts (default jax.process_count()).
    num_workers: override of config.data.num_workers.

  Returns:
    A `grain.DatasetIterator` (get_state/set_state with JSON-able dicts;
    close() when done) of {'tokens' int32 [b, T], 'valid' bool [b, T]} (+
    'segment_ids', 'positions' with packing; + 'acoustic_tokens' int32
    [b, T, model.num_quantizers] when config.model.kind is 's2a'), b = global
    batch / process count. With bucketing T is one of the bucket lengths, the same on every
    host at each step (agreed by a one-integer all-gather when there are
    several processes); with packing T = seq_length. Use num_epochs = 0 with
    several processes: with a finite number of epochs, hosts may run out one
    batch apart.
  """
  simulated = process_index is not None and process_count is not None
  if not simulated:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  global_batch = config.train.global_batch_size
  if global_batch % process_count:
    raise ValueError(f"train.global_batch_size {global_batch} is not divisible by {process_count} processes")
  ds = host_batch_dataset(config.data, batch_size=global_batch // process_count,
                          max_length=config.train.seq_length, process_index=process_index,
                          process_count=process_count, num_workers=num_workers,
                          acoustic_layers=acoustic_layers(config))
  it = iter(ds)
  return it if simulated or config.data.packing else AgreedLengthIterator(it)


def make_train_iterator(config, sharding=None, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        num_workers: Optional[int] = None) -> grain.DatasetIterator:
  """Training batches as global jax.Arrays (or host numpy batches if no sharding).

  Args:
    config: the full config (see `make_local_iterator`).
    sharding: NamedSharding of the batch (e.g. `batch_sharding(mesh)`); None
      yields host-local numpy batches instead of global jax.Arrays.
    process_index: override of jax.process_index() (tests, manual sharding).
    process_count: override of jax.process_count().
    num_workers: override of config.data.num_workers.

  Returns:
    A `grain.DatasetIterator` (get_state/set_state; close() when done) of
    batches in the format of the module docstring.
  """
  it = make_local_iterator(config, process_index, process_count, num_workers)
  return GlobalBatchIterator(it, sharding, agree_length=False) if sharding is not None else it


# ---------------------------------------------------------------------------
# Checkpointing (Orbax + grain.checkpoint).


def get_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's state (JSON-serializable, a few hundred bytes per host)."""
  return iterator.get_state()


def set_state(iterator: grain.DatasetIterator, state: dict[str, Any]) -> None:
  """Restores a state from `get_state` (same pipeline config and worker count)."""
  iterator.set_state(state)


def checkpoint_args(iterator: grain.DatasetIterator, restore: bool = False):
  """Orbax args for the data item of a CheckpointManager.

  Use with `ocp.CheckpointManager(dir, item_handlers={'data':
  grain.checkpoint.CheckpointHandler(), ...})` and
  `ocp.args.Composite(data=checkpoint_args(it), ...)` to save, or
  `checkpoint_args(it, restore=True)` to restore (in place).
  """
  return grain.checkpoint.CheckpointRestore(iterator) if restore else grain.checkpoint.CheckpointSave(iterator)


def save_iterator(iterator: grain.DatasetIterator, directory: str) -> None:
  """Saves the iterator state to `directory` (one JSON file per process)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
    ckpt.save(os.path.abspath(directory), args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator(iterator: grain.DatasetIterator, directory: str) -> grain.DatasetIterator:
  """Restores the state saved by `save_iterator` into `iterator` (in place)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckpt:
    return ckpt.restore(os.path.abspath(directory), args=grain.checkpoint.CheckpointRestore(iterator))
