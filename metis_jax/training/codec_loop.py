r"""Trains the codecs (the original trainers are not released) with the stage-1 training engine.

  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py --workdir /tmp/codec_tiny
  python -m metis_jax.codec_train --config configs/acoustic_codec.py --workdir gs://B/ac \
      --config.data.train_sources='("/data/emilia",)'
  python -m metis_jax.codec_train --config configs/semantic_codec_tiny.py --workdir /tmp/sem_tiny
  python -m metis_jax.codec_train --config configs/semantic_codec.py --workdir /tmp/sem \
      --config.features.w2v_bert_weights=w2v-bert-2.0/model.safetensors \
      --config.features.w2v_bert_stats=w2v_stats.npz --config.data.train_sources='("/data/x",)'

`train(config, workdir)` runs (or resumes) a codec run config
(`metis_jax.codec_config`; `config.model.kind` is 'acoustic_codec' or
'semantic_codec'): the mesh from `config.mesh`; the state (generator,
discriminator, both optimizer states, step, RNG, skip counters, code usage)
created sharded by the logical rules (`codec_train_state`), its codebooks
drawn from the first batch when `train.codebook_init` is 'data'; the jitted,
sharded, donated steps of `codec_train_step`; Grain batches of random audio
crops (`data.waveform_pipeline`) as global arrays over (data, fsdp); Orbax
checkpoints through `checkpointing.Checkpointer` (with the data iterator;
auto-resume to the same results as an uninterrupted run; a state with a
non-finite parameter is never saved); SIGTERM saves and stops; TensorBoard,
`metrics.jsonl` and a progress line (process 0).

At the end the parameters are exported in the released safetensors layout
(`<workdir>/encoder.safetensors` + `decoder.safetensors`, or
`<workdir>/semantic_codec.safetensors`), which the converters,
`metis_jax.model_loading` and `python -m metis_jax.codec_report` read.

Jitted steps are memoized per (config, mesh), so a process that calls
`train` again with the same config (a resumed run in a test or a notebook)
does not compile again.
"""

import dataclasses
import functools
import json
import logging as std_logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from metis_jax.models import acoustic_codec as ac
from metis_jax.training import checkpointing
from metis_jax.training import codec_state as cts
from metis_jax.training import codec_step as codec_train_step
from metis_jax.parallel import distributed
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import metrics as metrics_lib
from metis_jax.models import semantic_codec as sc

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- synthetic features


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


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- metrics

# Metrics on the progress line, by codec kind (others go to TensorBoard and metrics.jsonl only).
LINE_KEYS = {
    ac.KIND: ("mel", "adv", "feature_matching", "disc_loss", "commit", "codebook", "codes_used"),
    sc.KIND: ("loss", "reconstruction", "commit", "codebook", "codes_used", "perplexity"),
}


def progress_line(step: int, total: int, values: dict[str, float], keys: Sequence[str]) -> str:
  """'step 120/300 | 2.10 step/s 4.2 s audio/s | mel 4.81 adv 0.91 ... | gnorm 1.2 lr 1.0e-03'."""
  timed = "steps_per_second" in values
  parts = [f"step {step}/{total}",
           (f"{values['steps_per_second']:.2f} step/s {values['audio_seconds_per_second']:.1f} s audio/s"
            if timed else "compiling"),
           " ".join(f"{k} {values[k]:.4g}" for k in keys if k in values),
           f"gnorm {values['grad_norm']:.3g} lr {values['learning_rate']:.2e}"]
  skipped = int(values.get("skipped_steps", 0)) + int(values.get("disc_skipped_steps", 0))
  if skipped:
    parts.append(f"skipped updates {skipped}")
  if values.get("skipped_files", 0):
    parts.append(f"skipped files {int(values['skipped_files'])}")
  return " | ".join(parts)


class CodecMetricsLogger(metrics_lib.MetricsLogger):
  """`metrics.MetricsLogger` for codec runs: same one-step-late reads and TensorBoard scalars;
  throughput in audio seconds per second instead of tokens and MFU; also writes
  `<workdir>/metrics.jsonl` (one line per step, process 0)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, setup: cts.CodecSetup,
               is_writer: Optional[bool] = None):
    self._init_common(workdir, config, is_writer)
    seconds = setup.crop / setup.sample_rate if setup.from_audio else setup.crop / 50.0
    self.audio_seconds_per_step = config.train.global_batch_size * seconds
    self.keys = LINE_KEYS[setup.kind]
    self.jsonl = None
    if self.is_writer and "://" not in workdir:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def _record(self, values: dict[str, float]) -> None:
    if self.jsonl is not None:
      self.jsonl.write(json.dumps(values) + "\n")
      self.jsonl.flush()

  def _add_throughput(self, values: dict[str, float], steps_per_second: float) -> None:
    values["steps_per_second"] = steps_per_second
    values["audio_seconds_per_second"] = steps_per_second * self.audio_seconds_per_step

  def _progress_line(self, step: int, values: dict[str, float]) -> str:
    return progress_line(step, self.total_steps, values, self.keys)

  def close(self) -> None:
    super().close()
    if self.jsonl is not None:
      self.jsonl.close()
      self.jsonl = None


# ----------------------------------------------------------------------------- export


def export(setup: cts.CodecSetup, params: Any, workdir: str) -> list[str]:
  """Writes the generator in the released safetensors layout (process 0); returns the paths."""
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


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class CodecTrainResult:
  """What a run did (for tests and scripts)."""
  final_step: int
  start_step: int
  preempted: bool
  history: list
  exported: list
  skipped_files: int = 0
  state: Optional[cts.CodecTrainState] = None


_STEPS_CACHE: dict = {}


def _cached_steps(setup, config, mesh, shardings, encoder_shardings) -> codec_train_step.JittedSteps:
  key = (config.to_json_best_effort(sort_keys=True), tuple(d.id for d in mesh.devices.flat),
         tuple(mesh.shape.items()))
  if key not in _STEPS_CACHE:
    _STEPS_CACHE.clear()  # one run's executables at a time
    _STEPS_CACHE[key] = codec_train_step.jit_steps(setup, config, mesh, shardings, encoder_shardings)
  return _STEPS_CACHE[key]


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0 and "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str, *, devices: Optional[Sequence] = None,
          stop_after: Optional[int] = None, return_state: bool = False) -> CodecTrainResult:
  """Runs (or resumes) a codec run until `config.train.steps` or SIGTERM, then exports the codec.

  Args:
    config: a codec run config (`codec_config`; `config.model.kind` names the codec).
    workdir: run directory (checkpoints/, tensorboard/, metrics.jsonl, config.json, the
      exported safetensors).
    devices: the mesh's devices (default all).
    stop_after: stop after this step without a final save, as if the job were
      killed there (tests); the schedule still spans `train.steps`.
    return_state: keep the final state in the result.
  """
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  setup = cts.make_setup(config)
  shardings = cts.state_shardings(setup, mesh)
  if setup.from_audio:
    config = with_demo_audio(config, workdir)
  data = make_data_iterator(config, setup, mesh)
  _write_config(workdir, config)
  ckpt = (checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
          if config.checkpoint.enabled else None)
  latest = ckpt.latest_step() if ckpt else None
  if latest is not None:
    logging.info("resuming from checkpoint %d", latest)
    state = ckpt.restore(latest, cts.abstract_state(setup, mesh), data)
  else:
    state = cts.create_sharded_state(setup, mesh, config.seed)
  step = start_step = int(jax.device_get(state.step))
  encoder = cts.create_encoder(setup, config, mesh)
  encoder_sh = cts.encoder_shardings(setup.encoder, mesh, setup.rules) if encoder is not None else None
  steps = _cached_steps(setup, config, mesh, shardings, encoder_sh)
  logging.info("%s on mesh %s: %s parameters; global batch %d x %d %s", setup.kind, mesh_lib.describe(mesh),
               ", ".join(f"{k} {cts.count_params(v) / 1e6:.2f}M" for k, v in state.params.items()),
               config.train.global_batch_size, setup.crop, "samples" if setup.from_audio else "frames")

  logger = CodecMetricsLogger(workdir, config, setup)
  profile = metrics_lib.ProfileWindow(workdir, config.logging.profile_start_step,
                                      config.logging.profile_num_steps)
  watcher = checkpointing.PreemptionWatcher(config.checkpoint.save_on_preemption)
  total = config.train.steps
  preempted, killed = False, False
  started = time.perf_counter()
  local = data.local
  try:
    while step < total:
      profile.before_step(step)
      try:
        batch = next(data)
      except StopIteration:
        logging.warning("the input pipeline ran out of data at step %d (data.num_epochs); stopping", step)
        break
      if step == 0 and config.train.get("codebook_init", "random") == "data":
        state = steps.init_codebooks(state, batch, encoder)
        logging.info("codebooks drawn from the first batch's latents")
      state, step_metrics = steps(state, batch, encoder)
      step += 1
      if hasattr(local, "skipped_files"):
        step_metrics = dict(step_metrics, skipped_files=np.float32(local.skipped_files))
      logger.push(step, step_metrics)
      if ckpt:
        ckpt.save(step, state, data)
      if stop_after is not None and step >= stop_after:
        killed = True
        break
      if watcher.reached(step):
        preempted = True
        logging.warning("preemption: saving step %d and stopping", step)
        if ckpt:
          ckpt.save(step, state, data, force=True)
        break
    logger.flush()
    if ckpt and step > start_step and not killed:
      ckpt.save(step, state, data, force=True)
  finally:
    profile.end()
    logger.close()
    watcher.close()
    if ckpt:
      ckpt.close()
    if hasattr(data, "close"):
      data.close()
  exported = [] if killed else export(setup, state.params[cts.GENERATOR], workdir)
  logging.info("stopped at step %d after %.1f s%s%s", step, time.perf_counter() - started,
               " (preempted)" if preempted else "", f"; wrote {', '.join(exported)}" if exported else "")
  return CodecTrainResult(final_step=step, start_step=start_step, preempted=preempted, history=logger.history,
                          exported=exported, skipped_files=int(getattr(local, "skipped_files", 0)),
                          state=state if return_state else None)


# ----------------------------------------------------------------------------- command line


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax and Grain."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/grain/"))


def define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Codec config file (configs/*codec*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, logs and the exported codec.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process jobs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  train(FLAGS.config, FLAGS.workdir)



def run_main() -> None:
  """`python -m metis_jax.codec_train`."""
  define_flags()
  app.run(main)
