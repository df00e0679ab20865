"""The trainer's data source: one call, `make_train_iterator(config, mesh, process_index, process_count)`.

It returns an iterator of *global* batches, `{'tokens': int32 [B, T],
'valid': bool [B, T]}` (plus `'acoustic_tokens': int32 [B, T, Q]` for S2A,
`config.model.kind = 's2a'`, Q = `model.num_quantizers`; `tokens` are always
the SSL tokens) as `jax.Array`s sharded over (data, fsdp): a
`data.batches.GlobalBatchIterator`, the one batch path every trainer uses.
The iterator also has `get_state() -> bytes` / `set_state(bytes)`, so the
checkpoint saves it as its own item through Grain's Orbax handler (one small
JSON file per process). What is training-specific lives here: the synthetic
sources and which keys a batch carries for the model's objective.

Sources:
  * `config.train.synthetic_data = True`: `SyntheticSource`, deterministic
    token sequences (no files needed; smoke tests, benchmarks, the demo),
    with acoustic tokens derived from them for S2A (`synthetic_acoustic`).
  * otherwise the Grain pipeline of `metis_jax.data.pipeline` (ArrayRecord
    shards of tokenized speech listed in `config.data.train_sources`). With
    length bucketing (the default) T varies between the bucket lengths and
    the train step compiles once per bucket, all before the first step
    (`batch_specs` lists them; `training/compile_ahead.py`);
    packing (`data.packing`) is rejected by the train step (see
    `train_step.check_batch`).
"""

from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from metis_jax.data.batches import GlobalBatchIterator
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import objectives as train_objectives

__all__ = ["GlobalBatchIterator", "SyntheticSource", "batch_spec", "batch_specs", "configured_batch_specs",
           "local_batch_size", "make_train_iterator", "synthetic_acoustic", "synthetic_rows"]


def local_batch_size(global_batch: int, mesh: Mesh, process_count: int) -> int:
  """Rows of the global batch this process feeds (its devices' share)."""
  dp = mesh_lib.data_parallel_size(mesh)
  if global_batch % dp:
    raise ValueError(f"global_batch_size {global_batch} is not divisible by the data-parallel "
                     f"size {dp} (mesh {dict(mesh.shape)})")
  if global_batch % process_count:
    raise ValueError(f"global_batch_size {global_batch} is not divisible by {process_count} processes")
  return global_batch // process_count


def synthetic_rows(seed: int, step: int, rows: np.ndarray, seq_length: int,
                   vocab_size: int) -> dict[str, np.ndarray]:
  """Deterministic rows of the synthetic batch `step`.

  Row r of batch s depends only on (seed, s, r), so the global batch is the
  same whatever the number of processes. Like SSL tokens at 50 Hz, a row is
  a sequence of runs: ids drawn from a skewed (Zipf) distribution, each
  repeated 1 to 6 times, so a masked token is predictable when another token
  of its run is visible (and frequent ids are easy guesses even when not).
  Lengths are random in [T/4, T]; the rest is padding.

  Args:
    seed: data seed.
    step: batch index (0-based).
    rows: `[n]` global row indices to generate.
    seq_length: T.
    vocab_size: V.

  Returns:
    {'tokens': int32 `[n, T]`, 'valid': bool `[n, T]`}.
  """
  tokens = np.zeros((len(rows), seq_length), np.int32)
  valid = np.zeros((len(rows), seq_length), bool)
  for i, row in enumerate(rows):
    rs = np.random.default_rng([seed, step, int(row)])
    ids = (rs.zipf(1.2, seq_length) - 1) % vocab_size
    repeats = rs.integers(1, 7, seq_length)
    seq = np.repeat(ids, repeats)[:seq_length]
    length = rs.integers(max(seq_length // 4, 1), seq_length + 1)
    tokens[i, :length] = seq[:length]
    valid[i, :length] = True
  return {"tokens": tokens, "valid": valid}


def synthetic_acoustic(seed: int, step: int, rows: np.ndarray, tokens: np.ndarray, valid: np.ndarray,
                       num_layers: int, codebook_size: int, noise: float = 0.1) -> np.ndarray:
  """Deterministic codec tokens for synthetic S2A batches.

  Layer q of frame t is a fixed function of the SSL token at t,
  `(token * (2q + 3) * 131 + 17 q) mod codebook_size`, replaced by a random
  code with probability `noise`: an S2A model can learn it from its
  condition (the loss falls), but not perfectly. Row r depends only on
  (seed, step, r), like `synthetic_rows`.

  Args:
    seed, step, rows: as `synthetic_rows`.
    tokens: int32 `[n, T]` SSL tokens of those rows; valid: bool `[n, T]`.
    num_layers: Q; codebook_size: C.

  Returns:
    int32 `[n, T, Q]`, 0 at padding.
  """
  q = np.arange(num_layers)
  codes = (tokens[..., None].astype(np.int64) * (2 * q + 3) * 131 + 17 * q) % codebook_size
  for i, row in enumerate(rows):
    rs = np.random.default_rng([seed, step, int(row), 1])
    flip = rs.random(codes.shape[1:]) < noise
    codes[i] = np.where(flip, rs.integers(0, codebook_size, codes.shape[1:]), codes[i])
  return np.where(valid[..., None], codes, 0).astype(np.int32)


class SyntheticSource:
  """Per-process iterator of synthetic local batches; its state is the batch index.

  With `acoustic_layers` > 0 (S2A) batches also carry `acoustic_tokens`
  `[b, T, acoustic_layers]` (see `synthetic_acoustic`).
  """

  def __init__(self, seed: int, global_batch: int, seq_length: int, vocab_size: int,
               process_index: int, process_count: int, acoustic_layers: int = 0,
               acoustic_codebook_size: int = 0):
    self.seed, self.seq_length, self.vocab_size = seed, seq_length, vocab_size
    self.acoustic_layers, self.acoustic_codebook_size = acoustic_layers, acoustic_codebook_size
    local = global_batch // process_count
    self.rows = np.arange(process_index * local, (process_index + 1) * local)
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = synthetic_rows(self.seed, self.step, self.rows, self.seq_length, self.vocab_size)
    if self.acoustic_layers:
      batch["acoustic_tokens"] = synthetic_acoustic(self.seed, self.step, self.rows, batch["tokens"],
                                                    batch["valid"], self.acoustic_layers,
                                                    self.acoustic_codebook_size)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step = int(state["step"])


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch (for compiling before data exists)."""
  return train_objectives.batch_spec(config)


def batch_specs(config: ml_collections.ConfigDict) -> list[dict[str, jax.ShapeDtypeStruct]]:
  """Every global batch shape training on `config` can produce, shortest T first.

  One spec (`batch_spec`) for synthetic data; with the Grain pipeline one per
  bucket length of its schedule (`data.pipeline.bucket_lengths`, which reads
  a small sample of the data), so the trainer can compile the step for each
  before the first one; the last has T = train.seq_length, the largest.
  """
  if config.train.synthetic_data or not config.data.train_sources:
    return [batch_spec(config)]
  from metis_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  lengths = pipeline.bucket_lengths(config, train_objectives.acoustic_layers(config))
  return [train_objectives.batch_spec(config, length=t) for t in lengths]


def configured_batch_specs(config: ml_collections.ConfigDict) -> list[dict[str, jax.ShapeDtypeStruct]]:
  """Every global batch shape `config` allows, from the config alone (no data read), shortest first.

  One spec for synthetic data or packing; otherwise one per length bucket of `config.data`
  (`data.bucket_lengths`, default `default_buckets(train.seq_length)`): a superset of
  `batch_specs`, whose schedule may never use some bucket (the AOT dry run compiles these).
  """
  if config.train.synthetic_data or config.data.packing:
    return [batch_spec(config)]
  from metis_jax.data import bucketing  # pylint: disable=import-outside-toplevel
  length = int(config.train.seq_length)
  lengths = bucketing.check_buckets(config.data.bucket_lengths or bucketing.default_buckets(length), length)
  return [train_objectives.batch_spec(config, length=t) for t in lengths]


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> GlobalBatchIterator:
  """The training batches for this process, as global arrays on `mesh`.

  Args:
    config: the run config (`train.global_batch_size`, `train.seq_length`,
      `train.synthetic_data`, `config.data` for the corpus).
    mesh: the device mesh.
    process_index: this process (default `jax.process_index()`); giving both
      index and count simulates one host of a multi-process run.
    process_count: number of processes (default `jax.process_count()`).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  global_batch = config.train.global_batch_size
  local_batch_size(global_batch, mesh, count)  # validates divisibility
  if config.train.synthetic_data:
    local = SyntheticSource(config.seed, global_batch, config.train.seq_length,
                            train_objectives.cond_vocab_size(config), index, count,
                            acoustic_layers=train_objectives.acoustic_layers(config),
                            acoustic_codebook_size=config.model.vocab_size)
    return GlobalBatchIterator(local, mesh, global_batch)
  if not config.data.train_sources:
    raise ValueError("no training data: set config.data.train_sources (tokenized shards, see "
                     "metis_jax/data) or train on synthetic tokens with "
                     "--config.train.synthetic_data=True")
  from metis_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  # Host numpy batches; every host's batch has the same (scheduled bucket)
  # length at each step, so assembling the global array needs no collective.
  local = pipeline.make_local_iterator(config, index, count,
                                       acoustic_layers=train_objectives.acoustic_layers(config))
  return GlobalBatchIterator(local, mesh, global_batch)
