"""Batches of a codec run: random audio crops, or synthetic feature frames (semantic codec).

Audio: `data.waveform_pipeline` crops at the codec's rate, `{'wav': float32
[B, N], 'lengths': int32 [B]}`; with `data.demo_corpus` and no sources the
espeak-ng demo corpus is synthesized first. Synthetic features (semantic
codec, `features.source = 'synthetic'`): `{'features': float32 [B, T, H]}`
of clustered feature-like frames, deterministic per (seed, step, row). Either
way the host batches become global arrays over (data, fsdp) in an
`input_pipeline.GlobalBatchIterator`, checkpointable with the run.
"""

import functools
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from metis_jax.training import codec_state as cts
from metis_jax.training import input_pipeline


@functools.lru_cache(maxsize=8)
def _centers(dim: int, clusters: int, seed: int, rank: int) -> np.ndarray:
  crng = np.random.default_rng(seed)
  basis = crng.standard_normal((rank, dim)) / np.sqrt(rank)
  return (crng.standard_normal((clusters, rank)) @ basis).astype(np.float32)


def synthetic_features(rng: np.random.Generator, batch: int, frames: int, dim: int, clusters: int = 512,
                       seed: int = 1234, rank: int | None = None) -> np.ndarray:
  """Feature-like frames `[batch, frames, dim]`: each frame a noisy copy (noise 0.3) of one of
  `clusters` fixed unit-variance centers, held for a few frames (runs of 1-6), like phones in SSL
  features. The centers span a `rank`-dimensional subspace (default dim / 8), as SSL features
  are far from full rank."""
  centers = _centers(dim, clusters, seed, rank or max(1, dim // 8))
  out = np.empty((batch, frames, dim), np.float32)
  for b in range(batch):
    t = 0
    while t < frames:
      run = int(rng.integers(1, 7))
      out[b, t:t + run] = centers[rng.integers(clusters)]
      t += run
  return out + 0.3 * rng.standard_normal(out.shape).astype(np.float32)


class SyntheticFeatureSource:
  """Per-process synthetic feature batches `{'features': [b, T, H]}`; its state is the batch index.

  Row r of batch s depends only on (seed, s, r), whatever the number of processes.
  """

  def __init__(self, seed: int, global_batch: int, frames: int, dim: int, clusters: int,
               process_index: int, process_count: int):
    self.seed, self.frames, self.dim, self.clusters = seed, frames, dim, clusters
    local = global_batch // process_count
    self.rows = range(process_index * local, (process_index + 1) * local)
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [synthetic_features(np.random.default_rng([self.seed, self.step, r]), 1, self.frames, self.dim,
                               self.clusters) for r in self.rows]
    self.step += 1
    return {"features": np.concatenate(rows)}

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step = int(state["step"])


def with_demo_audio(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """With `data.demo_corpus` and no sources, synthesizes the demo corpus and trains on it."""
  if config.data.train_sources or not config.data.demo_corpus:
    return config
  from metis_jax.data import waveform_pipeline  # pylint: disable=import-outside-toplevel
  corpus = waveform_pipeline.prepare_demo_corpus(os.path.join(workdir, "demo_data", "corpus"), log=logging.info,
                                                 process_index=jax.process_index())
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.train_sources = (corpus,)
  return config


def make_data_iterator(config: ml_collections.ConfigDict, setup: cts.CodecSetup, mesh,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> input_pipeline.GlobalBatchIterator:
  """Global batches for this process (audio crops, or synthetic features), checkpointable."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  global_batch = config.train.global_batch_size
  local_batch = input_pipeline.local_batch_size(global_batch, mesh, count)
  if not setup.from_audio:
    local = SyntheticFeatureSource(config.seed, global_batch, setup.crop, setup.codec_config.hidden_size,
                                   config.features.synthetic_clusters, index, count)
  else:
    from metis_jax.data import waveform_pipeline  # pylint: disable=import-outside-toplevel
    local = waveform_pipeline.make_local_iterator(config.data, sample_rate=setup.sample_rate, crop=setup.crop,
                                                  batch_size=local_batch, process_index=index,
                                                  process_count=count)
  return input_pipeline.GlobalBatchIterator(local, mesh, global_batch)
