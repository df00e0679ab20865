"""The masked generative token objective of the training loop: stage-1 Metis ('metis') and S2A ('s2a').

An `objective.Objective`: state `state.TrainState` (one parameter tree, one
optimizer), step `step.train_step` (corruption and loss from
`objectives.MetisObjective` / `objectives.S2AObjective`), batches from
`input_pipeline.make_train_iterator` (token shards, the demo corpus or
synthetic tokens), throughput in tokens/s with MFU, nothing exported (the
checkpoints are the product).
"""

import dataclasses
import os
from typing import Any, Optional

import ml_collections
from absl import logging
from jax.sharding import Mesh

from metis_jax.models import metis
from metis_jax.training import compile_ahead as compile_ahead_lib
from metis_jax.training import input_pipeline
from metis_jax.training import metrics as metrics_lib
from metis_jax.training import objective as objective_lib
from metis_jax.training import objectives as train_objectives
from metis_jax.training import state as train_state
from metis_jax.training import step as train_step_lib


def with_demo_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """With `data.demo_corpus` and no sources, builds the demo shards and trains on them.

  For S2A (`model.kind = 's2a'`) the shards also carry the demo's acoustic
  tokens (a residual k-means of log-mel frames with `model.vocab_size` codes,
  not a neural codec; see `metis_jax.data.demo`), and the last sentence of
  every voice is held out of training (for `train_eval`).
  """
  if config.train.synthetic_data or config.data.train_sources or not config.data.demo_corpus:
    return config
  from metis_jax.data import demo  # pylint: disable=import-outside-toplevel
  ssl_vocab = train_objectives.cond_vocab_size(config)
  if config.data.kmeans_clusters != ssl_vocab:
    what = "model.cond_vocab_size" if train_objectives.kind_of(config) == "s2a" else "model.vocab_size"
    raise ValueError(f"data.kmeans_clusters ({config.data.kmeans_clusters}) must equal "
                     f"{what} ({ssl_vocab}) to train on the demo corpus")
  acoustic = config.model.vocab_size if train_objectives.acoustic_layers(config) else 0
  shards = demo.prepare(os.path.join(workdir, "demo_data"), config.data, log=logging.info,
                        acoustic_codebook_size=acoustic)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.train_sources = (shards,)
  return config


@dataclasses.dataclass(frozen=True)
class _Steps:
  """`step.jit_train_step`'s function; a fresh run starts from its initial state as is."""
  step_fn: Any

  def start(self, state: train_state.TrainState, batch) -> train_state.TrainState:
    del batch
    return state

  def __call__(self, state: train_state.TrainState, batch):
    return self.step_fn(state, batch)

  def compile_ahead(self, state: train_state.TrainState, specs) -> tuple["_Steps", compile_ahead_lib.AheadCompiled]:
    """These steps with the step compiled for every batch spec (`compile_ahead.compile_ahead`)."""
    ahead = compile_ahead_lib.compile_ahead(self.step_fn, state, specs)
    return _Steps(ahead), ahead


@dataclasses.dataclass(frozen=True)
class MaskedObjective:
  """Stage 1 or S2A (by `config.model.kind`), for `training/loop.py`."""
  setup: train_state.Setup
  config: ml_collections.ConfigDict

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "MaskedObjective":
    return cls(train_state.make_setup(config), config)

  @property
  def kind(self) -> str:
    return self.setup.objective.kind

  def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    return with_demo_data(config, workdir)

  def state_shardings(self, mesh: Mesh) -> train_state.TrainState:
    return train_state.state_shardings(self.setup, mesh)

  def abstract_state(self, mesh: Mesh) -> train_state.TrainState:
    return train_state.abstract_state(self.setup, mesh)

  def create_state(self, mesh: Mesh, seed: int) -> train_state.TrainState:
    return train_state.create_sharded_state(self.setup, mesh, seed)

  def batch_spec(self):
    return input_pipeline.batch_spec(self.config)

  def batch_specs(self, config: ml_collections.ConfigDict):
    return input_pipeline.batch_specs(config)

  def data_iterator(self, config: ml_collections.ConfigDict, mesh: Mesh, process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> input_pipeline.GlobalBatchIterator:
    return input_pipeline.make_train_iterator(config, mesh, process_index, process_count)

  def compile(self, config: ml_collections.ConfigDict, mesh: Mesh) -> _Steps:
    return _Steps(train_step_lib.jit_train_step(self.setup, config, mesh, self.state_shardings(mesh),
                                                self.batch_spec()))

  def progress(self, config: ml_collections.ConfigDict) -> objective_lib.Progress:
    t = config.train
    return objective_lib.Progress(
        unit="tokens", units_per_step=t.global_batch_size * t.seq_length, line=metrics_lib.progress_line,
        flops_per_unit=metrics_lib.training_flops_per_token(config.model, t.seq_length))

  def describe(self, state: train_state.TrainState, config: ml_collections.ConfigDict) -> str:
    t = config.train
    return (f"model.kind {self.kind!r}; {metis.count_params(state.params) / 1e6:.1f}M parameters; "
            f"global batch {t.global_batch_size} x {t.seq_length} tokens; "
            f"{metrics_lib.training_flops_per_token(config.model, t.seq_length):.3g} training FLOPs/token")

  def export(self, state: train_state.TrainState, workdir: str) -> list[str]:
    del state, workdir
    return []
