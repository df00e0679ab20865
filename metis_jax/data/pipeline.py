"""The Grain training input pipeline: tokenized shards -> global jax.Array batches.

Per host (JAX process), with the Grain Dataset API and the shared chain of
`data.batches`:

  ArrayRecordDataSource (or tfds.data_source) per corpus
    -> batches.source_chain           shuffle(seed) per corpus, decode
                                      (record bytes -> int32 tokens [T]
                                      (+ acoustic [T, Q])), repeat, mix
                                      (weights), [process_index::process_count]
    -> random crop to max_length, drop if shorter than min_length
    -> batches.host_iter_dataset      to_iter_dataset -> mp_prefetch(num_workers)
    -> length-bucketed batching (data.bucketing; or packing)   host batches
    -> batches.GlobalBatchIterator    global jax.Arrays on the caller's sharding

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

Bucketing (`data.bucketing`): elements are read in windows of `bucket_window`
batches, sorted by length and cut into batches; each batch's padded length
comes from a schedule every host computes alike from the config (a sample of
the data's lengths, the seed and the step), so hosts never exchange lengths
(no per-step collective); a row longer than its batch's scheduled length is
cropped to it. `bucket_lengths(config)` lists every length a config can
produce. Packing (`config.data.packing`) gives a fixed [batch, max_length]
instead.

Entry points: `make_local_iterator(config)` (host numpy batches, for a caller
that assembles global arrays itself, like `training.input_pipeline`) and
`make_train_iterator(config, sharding)` (global jax.Arrays). With bucketing,
T takes one of `bucket_lengths(config)` (set `config.data.bucket_lengths =
(seq_length,)` for a single shape); with packing T = seq_length.

Checkpointing: the host iterator is a `grain.DatasetIterator` (with a
sharding, a `batches.GlobalBatchIterator` around it whose state is the same
JSON, as bytes); its state (a few hundred bytes of JSON per host) is saved with Orbax through
`grain.checkpoint.CheckpointHandler` (see `checkpoint_args`,
`save_iterator`, `restore_iterator`). A restored iterator yields exactly the
batches the uninterrupted one would have (same sources, seeds and worker
count).
"""

import json
import os
from typing import Any, Optional, Sequence

import grain
import numpy as np

from metis_jax.data import batches
from metis_jax.data import bucketing
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
    return bucketing.crop_element(element, self.max_length, rng)


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
  srcs = []
  for spec in sources:
    src = open_source(spec, tfds_data_dir)
    if len(src) == 0:
      raise ValueError(f"source {spec!r} has no records")
    if acoustic_layers:
      check_acoustic(src, spec, acoustic_layers)
    srcs.append(src)
  # Decoding per source (lazy, element-wise: the order is unchanged) lets an
  # error name the corpus the record came from.
  decode = lambda i, ds: ds.map(_Decode(keep_ids, acoustic_layers, sources[i]))
  ds = batches.source_chain(srcs, weights, seed=seed, num_epochs=num_epochs, process_index=process_index,
                            process_count=process_count, per_source=decode)
  ds = ds.random_map(RandomCrop(max_length), seed=seed + 1)
  return ds.filter(MinLength(min_length))


def _packed_to_batch(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg = x["tokens_segment_ids"].astype(np.int32)
  return {"tokens": np.where(seg > 0, x["tokens"], 0).astype(np.int32), "valid": seg > 0,
          "segment_ids": seg, "positions": x["tokens_positions"].astype(np.int32)}


# ---------------------------------------------------------------------------
# Assembly.


def _element_dataset(cfg, *, max_length: int, process_index: int = 0, process_count: int = 1,
                     keep_ids: bool = False, acoustic_layers: int = 0) -> grain.MapDataset:
  return element_dataset(
      list(cfg.train_sources), list(cfg.train_weights), max_length=max_length, min_length=cfg.min_length,
      seed=cfg.seed, num_epochs=cfg.num_epochs, process_index=process_index, process_count=process_count,
      tfds_data_dir=cfg.tfds_data_dir, keep_ids=keep_ids, acoustic_layers=acoustic_layers)


def bucket_schedule(cfg, *, max_length: int, acoustic_layers: int = 0) -> bucketing.BucketSchedule:
  """The padded length of every batch (`data.bucketing`), the same in every process.

  With several buckets this reads a sample of the global element stream
  (`bucketing.SAMPLE_SIZE` kept records, the same records in every process).

  Args:
    cfg: `config.data`.
    max_length: crop length and largest bucket (train.seq_length).
    acoustic_layers: as `host_batch_dataset` (lengths are those of the aligned streams).
  """
  buckets = bucketing.check_buckets(cfg.bucket_lengths or bucketing.default_buckets(max_length), max_length)
  sample = ()
  if len(buckets) > 1:
    sample = bucketing.sample_lengths(_element_dataset(cfg, max_length=max_length,
                                                       acoustic_layers=acoustic_layers))
  return bucketing.BucketSchedule(buckets, sample, cfg.bucket_window, cfg.seed)


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
  elements = _element_dataset(cfg, max_length=max_length, process_index=process_index,
                              process_count=process_count, keep_ids=keep_ids, acoustic_layers=acoustic_layers)
  workers = cfg.num_workers if num_workers is None else num_workers
  ds = batches.host_iter_dataset(elements, _READ_OPTIONS, workers, cfg.worker_buffer_size)
  if cfg.packing:
    ds = grain.experimental.FirstFitPackIterDataset(
        ds.map(lambda x: {"tokens": x["tokens"]}), length_struct={"tokens": max_length},
        num_packing_bins=batch_size, seed=cfg.seed, shuffle_bins=True)
    return ds.batch(batch_size, drop_remainder=True).map(_packed_to_batch)
  schedule = bucket_schedule(cfg, max_length=max_length, acoustic_layers=acoustic_layers)
  return bucketing.BucketBatchIterDataset(ds, batch_size, schedule, keep_ids)


def _acoustic_layers_of(config) -> int:
  """Codec layers the batches of `config` carry: model.num_quantizers for S2A, else 0."""
  model = config.get("model")
  if model is None or model.get("kind", "metis") != "s2a":
    return 0
  return int(model.num_quantizers)


acoustic_layers = _acoustic_layers_of


def bucket_lengths(config, acoustic_layers: Optional[int] = None) -> tuple[int, ...]:  # pylint: disable=redefined-outer-name
  """Every padded length T the batches of `config` can have, increasing.

  The trainer compiles its step for each `[global_batch, T]` before the first
  step. With packing, (train.seq_length,). `acoustic_layers` as
  `make_local_iterator`.
  """
  if config.data.packing:
    return (int(config.train.seq_length),)
  layers = _acoustic_layers_of(config) if acoustic_layers is None else acoustic_layers
  return bucket_schedule(config.data, max_length=config.train.seq_length, acoustic_layers=layers).lengths()


def make_local_iterator(config, process_index: Optional[int] = None, process_count: Optional[int] = None,
                        num_workers: Optional[int] = None, *,
                        acoustic_layers: Optional[int] = None) -> grain.DatasetIterator:  # pylint: disable=redefined-outer-name
  """This host's training batches as numpy arrays (for a caller that builds global arrays).

  Args:
    config: the full config (reads `config.data`, `config.train.global_batch_size`
      and `config.train.seq_length`).
    process_index: this host (default jax.process_index()); passing both
      index and count simulates a slice of a multi-process run.
    process_count: number of hosts (default jax.process_count()).
    num_workers: override of config.data.num_workers.
    acoustic_layers: codec layers per frame Q (default: model.num_quantizers
      when config.model.kind is 's2a', else 0).

  Returns:
    A `grain.DatasetIterator` (get_state/set_state with JSON-able dicts;
    close() when done) of {'tokens' int32 [b, T], 'valid' bool [b, T]} (+
    'segment_ids', 'positions' with packing; + 'acoustic_tokens' int32
    [b, T, Q] when Q > 0), b = global batch / process count. With bucketing
    T is one of `bucket_lengths(config)`, the same on every host at each step
    (a schedule, no collective); with packing T = seq_length. Use num_epochs
    = 0 with several processes: with a finite number of epochs, hosts may run
    out one batch apart (and the last, partial windows may differ).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  global_batch = config.train.global_batch_size
  if global_batch % process_count:
    raise ValueError(f"train.global_batch_size {global_batch} is not divisible by {process_count} processes")
  layers = _acoustic_layers_of(config) if acoustic_layers is None else acoustic_layers
  ds = host_batch_dataset(config.data, batch_size=global_batch // process_count,
                          max_length=config.train.seq_length, process_index=process_index,
                          process_count=process_count, num_workers=num_workers, acoustic_layers=layers)
  return iter(ds)


def make_train_iterator(config, sharding=None, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, num_workers: Optional[int] = None):
  """Training batches as global jax.Arrays (or host numpy batches if no sharding).

  Args:
    config: the full config (see `make_local_iterator`).
    sharding: the batch sharding (e.g. `parallel.mesh.batch_sharding(mesh)`)
      or a Mesh (see `batches.make_global_batch`); None yields host-local
      numpy batches instead of global jax.Arrays.
    process_index: override of jax.process_index() (tests, manual sharding).
    process_count: override of jax.process_count().
    num_workers: override of config.data.num_workers.

  Returns:
    An iterator with get_state/set_state (close() when done) of batches in
    the format of the module docstring: the host `grain.DatasetIterator`, or
    a `batches.GlobalBatchIterator` around it.
  """
  it = make_local_iterator(config, process_index, process_count, num_workers)
  return batches.GlobalBatchIterator(it, sharding, config.train.global_batch_size) if sharding is not None else it


# ---------------------------------------------------------------------------
# Checkpointing (Orbax + grain.checkpoint).


def get_state(iterator) -> dict[str, Any]:
  """The iterator's state (JSON-serializable, a few hundred bytes per host)."""
  state = iterator.get_state()
  return json.loads(state.decode()) if isinstance(state, bytes) else state


def set_state(iterator, state: dict[str, Any]) -> None:
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
