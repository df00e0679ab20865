"""The codec objectives of the training loop: 'acoustic_codec' (GAN) and 'semantic_codec'.

An `objective.Objective`: state `codec_state.CodecTrainState` (params and
optimizer state per network: 'generator', and 'discriminator' for the
acoustic codec; code usage), steps `codec_step.jit_steps` (acoustic:
generator update, then discriminator update on the generator's output of the
same batch; semantic: one update, its input features computed inside the
step by the frozen w2v-BERT encoder, which `compile` creates sharded and
binds as a non-donated argument). A fresh run with `train.codebook_init =
'data'` draws every RVQ codebook from its first batch before the first step
(`Steps.start`); dead-code restarts happen inside the step. Batches:
`codec_data`. Throughput in seconds of audio per second. At the end the
generator is written in the released safetensors layout
(`encoder.safetensors` + `decoder.safetensors`, or
`semantic_codec.safetensors`), which the converters, the model loaders and
`python -m metis_jax.codec_report` read.
"""

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from metis_jax.models import acoustic_codec as ac
from metis_jax.models import semantic_codec as sc
from metis_jax.training import codec_data
from metis_jax.training import codec_state as cts
from metis_jax.training import codec_step
from metis_jax.training import metrics as metrics_lib
from metis_jax.training import objective as objective_lib

# Metrics on the progress line, by codec kind (the others go to TensorBoard and metrics.jsonl only).
LINE_KEYS = {
    ac.KIND: ("mel", "adv", "feature_matching", "disc_loss", "commit", "codebook", "codes_used"),
    sc.KIND: ("loss", "reconstruction", "commit", "codebook", "codes_used", "perplexity"),
}


def progress_line(step: int, total: int, values: dict[str, float], keys: Sequence[str]) -> str:
  """'step 120/300 | 2.1 step/s 4.2 s audio/s | mel 4.81 adv 0.91 ... | gnorm 1.2 lr 1.0e-03'."""
  timed = "steps_per_second" in values
  parts = [f"step {step}/{total}",
           (f"{metrics_lib.format_count(values['steps_per_second'])} step/s "
            f"{metrics_lib.format_count(values['audio_seconds_per_second'])} s audio/s"
            if timed else "compiling"),
           " ".join(f"{k} {values[k]:.4g}" for k in keys if k in values),
           f"gnorm {values['grad_norm']:.3g} lr {values['learning_rate']:.2e}"]
  skipped = int(values.get("skipped_steps", 0)) + int(values.get("disc_skipped_steps", 0))
  if skipped:
    parts.append(f"skipped updates {skipped}")
  if values.get("skipped_files", 0):
    parts.append(f"skipped files {int(values['skipped_files'])}")
  return " | ".join(parts)


def export(setup: cts.CodecSetup, params: Any, workdir: str) -> list[str]:
  """Writes the generator `params` in the released safetensors layout (process 0); returns the paths."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  if jax.process_index() != 0:
    return []
  if setup.kind == ac.KIND:
    from metis_jax.conversion import acoustic_codec as convert  # pylint: disable=import-outside-toplevel
    paths = [os.path.join(workdir, "encoder.safetensors"), os.path.join(workdir, "decoder.safetensors")]
    convert.save_amphion(*paths, params, setup.codec_config)
  else:
    from metis_jax.conversion import semantic_codec as convert  # pylint: disable=import-outside-toplevel
    paths = [os.path.join(workdir, "semantic_codec.safetensors")]
    convert.save_amphion(paths[0], params, setup.codec_config)
  return paths


@dataclasses.dataclass(frozen=True)
class _Steps:
  """`codec_step.JittedSteps` with the frozen feature encoder (or None) bound."""
  jitted: codec_step.JittedSteps
  encoder: Optional[cts.FrozenEncoder]
  codebooks_from_data: bool

  def start(self, state: cts.CodecTrainState, batch) -> cts.CodecTrainState:
    if not self.codebooks_from_data:
      return state
    logging.info("codebooks drawn from the first batch's latents")
    return self.jitted.init_codebooks(state, batch, self.encoder)

  def __call__(self, state: cts.CodecTrainState, batch):
    return self.jitted(state, batch, self.encoder)


@dataclasses.dataclass(frozen=True)
class CodecObjective:
  """The acoustic or the semantic codec (by `config.model.kind`), for `training/loop.py`."""
  setup: cts.CodecSetup
  config: ml_collections.ConfigDict

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CodecObjective":
    return cls(cts.make_setup(config), config)

  @property
  def kind(self) -> str:
    return self.setup.kind

  def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    return codec_data.with_demo_audio(config, workdir) if self.setup.from_audio else config

  def state_shardings(self, mesh: Mesh) -> cts.CodecTrainState:
    return cts.state_shardings(self.setup, mesh)

  def abstract_state(self, mesh: Mesh) -> cts.CodecTrainState:
    return cts.abstract_state(self.setup, mesh)

  def create_state(self, mesh: Mesh, seed: int) -> cts.CodecTrainState:
    return cts.create_sharded_state(self.setup, mesh, seed)

  def batch_spec(self):
    return codec_step.batch_spec(self.setup, self.config)

  def data_iterator(self, config: ml_collections.ConfigDict, mesh: Mesh, process_index: Optional[int] = None,
                    process_count: Optional[int] = None):
    return codec_data.make_data_iterator(config, self.setup, mesh, process_index, process_count)

  def compile(self, config: ml_collections.ConfigDict, mesh: Mesh) -> _Steps:
    encoder = cts.create_encoder(self.setup, config, mesh)
    encoder_sh = (cts.encoder_shardings(self.setup.encoder, mesh, self.setup.rules)
                  if encoder is not None else None)
    jitted = codec_step.jit_steps(self.setup, config, mesh, self.state_shardings(mesh), encoder_sh)
    return _Steps(jitted, encoder, config.train.codebook_init == "data")

  def progress(self, config: ml_collections.ConfigDict) -> objective_lib.Progress:
    s = self.setup
    seconds = s.crop / s.sample_rate if s.from_audio else s.crop / 50.0
    return objective_lib.Progress(unit="audio_seconds", units_per_step=config.train.global_batch_size * seconds,
                                  line=functools.partial(progress_line, keys=LINE_KEYS[s.kind]))

  def describe(self, state: cts.CodecTrainState, config: ml_collections.ConfigDict) -> str:
    params = ", ".join(f"{k} {cts.count_params(v) / 1e6:.2f}M" for k, v in state.params.items())
    return (f"{self.kind}: {params} parameters; global batch {config.train.global_batch_size} x "
            f"{self.setup.crop} {'samples' if self.setup.from_audio else 'frames'}")

  def export(self, state: cts.CodecTrainState, workdir: str) -> list[str]:
    return export(self.setup, state.params[cts.GENERATOR], workdir)
