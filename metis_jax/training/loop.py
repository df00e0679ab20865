r"""Trains a masked generative model: stage-1 Metis (SSL tokens) or S2A (acoustic codec tokens).

  python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_tiny
  python -m metis_jax.train --config configs/metis_base.py --workdir gs://B/run \
      --config.train.global_batch_size=512 --config.mesh.fsdp=-1
  python -m metis_jax.train --config configs/s2a_tiny.py --workdir /tmp/s2a_tiny
  python -m metis_jax.train --config configs/s2a_full.py --workdir gs://B/s2a \
      --config.data.train_sources='("gs://B/shards_with_acoustic_tokens",)'

`config.model.kind` picks the objective ('metis' or 's2a', see
`train_objectives`); the loop, sharding, checkpoints and metrics are shared.
Codec configs ('acoustic_codec', 'semantic_codec') are handed to
`metis_jax.codec_train.train`:

  python -m metis_jax.train --config configs/acoustic_codec_tiny.py --workdir /tmp/codec_tiny

Every `config` field can be overridden as `--config.a.b=value`; unknown keys
are errors. The run resumes from the newest checkpoint in `<workdir>` if
there is one. Multi-process jobs: see `metis_jax/distributed.py` and
`launch/`.

Outputs in `<workdir>`: `checkpoints/`, `tensorboard/`, `metrics.jsonl`
(one JSON line per step, process 0), `profile/` (when enabled), and
`config.json`.
"""

import dataclasses
import json
import logging as std_logging
import os
import time
from typing import Optional

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from metis_jax.training import checkpointing
from metis_jax.training import codec_config
from metis_jax.parallel import distributed
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.models import metis
from metis_jax.training import metrics as metrics_lib
from metis_jax.training import objectives as train_objectives
from metis_jax.training import state as train_state
from metis_jax.training import step as train_step_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing is free)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints and logs.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process jobs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass
class TrainResult:
  """What a run did (for tests and scripts)."""
  final_step: int
  start_step: int
  preempted: bool
  history: list
  state: Optional[train_state.TrainState] = None


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0 and "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


class _JsonlWriter:
  """One JSON line of metrics per step into `<workdir>/metrics.jsonl` (process 0)."""

  def __init__(self, workdir: str):
    self.file = None
    if jax.process_index() == 0 and "://" not in workdir:
      os.makedirs(workdir, exist_ok=True)
      self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, values: Optional[dict]) -> None:
    if self.file is not None and values is not None:
      self.file.write(json.dumps(values) + "\n")
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


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


def train(config: ml_collections.ConfigDict, workdir: str, return_state: bool = False) -> TrainResult:
  """Runs (or resumes) training until `config.train.steps` or SIGTERM.

  Args:
    config: the run config (see `config_base`).
    workdir: run directory.
    return_state: keep the final TrainState in the result (tests).
  """
  mesh = mesh_lib.create_mesh(config.mesh)
  setup = train_state.make_setup(config)
  shardings = train_state.state_shardings(setup, mesh)
  config = with_demo_data(config, workdir)
  data = input_pipeline.make_train_iterator(config, mesh)
  _write_config(workdir, config)
  ckpt = (checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
          if config.checkpoint.enabled else None)

  latest = ckpt.latest_step() if ckpt else None
  if latest is not None:
    logging.info("resuming from checkpoint %d", latest)
    state = ckpt.restore(latest, train_state.abstract_state(setup, mesh), data)
  else:
    state = train_state.create_sharded_state(setup, mesh, config.seed)
  step = start_step = int(jax.device_get(state.step))

  n_params = metis.count_params(state.params)
  logging.info("model.kind %r; mesh %s; %.1fM parameters; global batch %d x %d tokens; "
               "%.3g training FLOPs/token", setup.objective.kind,
               mesh_lib.describe(mesh), n_params / 1e6, config.train.global_batch_size,
               config.train.seq_length,
               metrics_lib.training_flops_per_token(config.model, config.train.seq_length))
  step_fn = train_step_lib.jit_train_step(setup, config, mesh, shardings,
                                          input_pipeline.batch_spec(config))
  logger = metrics_lib.MetricsLogger(workdir, config, mesh.devices.size,
                                     mesh.devices.flat[0].device_kind)
  jsonl = _JsonlWriter(workdir)
  profile = metrics_lib.ProfileWindow(workdir, config.logging.profile_start_step,
                                      config.logging.profile_num_steps)
  watcher = checkpointing.PreemptionWatcher(config.checkpoint.save_on_preemption)
  preempted = False
  total = config.train.steps
  started = time.perf_counter()
  try:
    while step < total:
      profile.before_step(step)
      try:
        batch = next(data)
      except StopIteration:
        logging.warning("the input pipeline ran out of data at step %d (data.num_epochs); stopping", step)
        break
      state, step_metrics = step_fn(state, batch)
      step += 1
      jsonl.write(logger.push(step, step_metrics))
      if ckpt:
        ckpt.save(step, state, data)
      if watcher.reached(step):
        preempted = True
        logging.warning("preemption: saving step %d and stopping", step)
        if ckpt:
          ckpt.save(step, state, data, force=True)
        break
    jsonl.write(logger.flush())
    if ckpt and step > start_step:
      ckpt.save(step, state, data, force=True)
  finally:
    profile.end()
    logger.close()
    jsonl.close()
    watcher.close()
    if ckpt:
      ckpt.close()
    if hasattr(data, "close"):
      data.close()
  logging.info("stopped at step %d after %.1f s%s", step, time.perf_counter() - started,
               " (preempted)" if preempted else "")
  return TrainResult(final_step=step, start_step=start_step, preempted=preempted,
                     history=logger.history, state=state if return_state else None)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax and Grain (dozens of lines per checkpoint)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/grain/"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if codec_config.is_codec_config(FLAGS.config):
    # The codecs (model.kind 'acoustic_codec' / 'semantic_codec') train with their own steps
    # (a GAN has two optimizers) on the same mesh, checkpoint and metrics machinery.
    from metis_jax.training import codec_loop as codec_train  # pylint: disable=import-outside-toplevel
    codec_train.train(FLAGS.config, FLAGS.workdir)
  else:
    train(FLAGS.config, FLAGS.workdir)



def run_main() -> None:
  """`python -m metis_jax.train`."""
  define_flags()
  app.run(main)
