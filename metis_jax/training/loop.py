r"""The training loop, one for every kind of run: stage-1 Metis, S2A, and the two codecs.

  python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_tiny
  python -m metis_jax.train --config configs/metis_base.py --workdir gs://B/run \
      --config.train.global_batch_size=512 --config.mesh.fsdp=-1
  python -m metis_jax.train --config configs/s2a.py:tiny --workdir /tmp/s2a_tiny
  python -m metis_jax.train --config configs/s2a_full.py --workdir gs://B/s2a \
      --config.data.train_sources='("gs://B/shards_with_acoustic_tokens",)'
  python -m metis_jax.train --config configs/acoustic_codec.py:tiny --workdir /tmp/codec_tiny
  python -m metis_jax.train --config configs/semantic_codec.py --workdir /tmp/sem \
      --config.features.w2v_bert_weights=w2v-bert-2.0/model.safetensors \
      --config.features.w2v_bert_stats=w2v_stats.npz --config.data.train_sources='("/data/x",)'

(`python -m metis_jax.codec_train` is the same command.) `config.model.kind`
picks the objective (`OBJECTIVES`; see `training/objective.py`): its state,
steps, batches, progress line and export. Everything else is here, once:
the mesh, restore or fresh sharded state, the step compiled for every batch
shape (length bucket) before the first step (`compile_ahead`: no step
compiles; the time and each bucket's per-device memory are logged), the
profile window, SIGTERM, metrics, checkpoints, the final save and the export.

Every `config` field can be overridden as `--config.a.b=value`; unknown keys
are errors. The run resumes from the newest checkpoint in `<workdir>` if
there is one (the same results as an uninterrupted run). Multi-process jobs:
see `metis_jax/parallel/distributed.py` and `launch/`.

Outputs in `<workdir>`: `checkpoints/`, `tensorboard/`, `metrics.jsonl`
(one JSON line per step, process 0), `profile/` (when enabled),
`config.json`, and what the objective exports (codecs: the released
safetensors files).
"""

import dataclasses
import logging as std_logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from metis_jax.parallel import compilation_cache
from metis_jax.parallel import distributed
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.data import fingerprint
from metis_jax.training import checkpointing
from metis_jax.training import codec_objective
from metis_jax.training import finetune_objective
from metis_jax.training import host_memory
from metis_jax.training import masked_objective
from metis_jax.training import metrics as metrics_lib
from metis_jax.training import objective as objective_lib
from metis_jax.training import run_logger

FLAGS = flags.FLAGS

# `config.model.kind` -> the objective's class (`from_config(config)` builds it).
OBJECTIVES = {
    "metis": masked_objective.MaskedObjective,
    "s2a": masked_objective.MaskedObjective,
    "acoustic_codec": codec_objective.CodecObjective,
    "semantic_codec": codec_objective.CodecObjective,
    finetune_objective.KIND: finetune_objective.FinetuneObjective,
}


def make_objective(config: ml_collections.ConfigDict) -> objective_lib.Objective:
  """The objective of `config.model.kind`."""
  kind = config.model.get("kind", "metis")
  if kind not in OBJECTIVES:
    raise ValueError(f"config.model.kind={kind!r} is not one of {sorted(OBJECTIVES)}; "
                     "start the config from metis_jax/config_base.py")
  return OBJECTIVES[kind].from_config(config)


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing is free)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, logs and exports.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process jobs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_string("compilation_cache_dir", None, compilation_cache.FLAG_HELP)
  flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass
class TrainResult:
  """What a run did (for tests and scripts).

  Attributes:
    final_step, start_step: steps done at the end and at the start (a resumed run starts > 0).
    preempted: stopped by SIGTERM (after saving).
    history: every step's metrics as read (floats, with `step`).
    exported: paths the objective wrote at the end (none when stopped by `stop_after`).
    skipped_files: input files the pipeline could not use (audio pipelines count them).
    state: the final state when asked for.
    ok, reason: whether the run may exit 0 (`checkpointing.final_status`: finite
      parameters, no more than `train.max_consecutive_skips` skipped updates in a row
      at the end), and why not.
  """
  final_step: int
  start_step: int
  preempted: bool
  history: list
  exported: list = dataclasses.field(default_factory=list)
  skipped_files: int = 0
  state: Optional[Any] = None
  ok: bool = True
  reason: str = "ok"


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0 and "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


_STEPS_CACHE: dict = {}


def _compiled_steps(objective: objective_lib.Objective, config: ml_collections.ConfigDict,
                    mesh, state: Any) -> objective_lib.Steps:
  """`objective.compile`, then every batch shape compiled ahead (`_compile_ahead`).

  Memoized per (config, mesh): a process that trains the same config again (a resumed run
  in a test or a notebook) does not compile again. One run's steps at a time.
  """
  key = (config.to_json_best_effort(sort_keys=True), tuple(d.id for d in mesh.devices.flat),
         tuple(mesh.shape.items()))
  if key not in _STEPS_CACHE:
    _STEPS_CACHE.clear()
    _STEPS_CACHE[key] = _compile_ahead(objective, objective.compile(config, mesh), config, state)
  return _STEPS_CACHE[key]


def _compile_ahead(objective: objective_lib.Objective, steps: objective_lib.Steps,
                   config: ml_collections.ConfigDict, state: Any) -> objective_lib.Steps:
  """`steps` with the step compiled for every batch shape of the run (its length buckets) before
  the first step, so that no step compiles; logs the time and each bucket's per-device memory.
  Steps without `compile_ahead` (the codecs) are returned as they are."""
  if not hasattr(steps, "compile_ahead"):
    return steps
  specs = objective.batch_specs(config) if hasattr(objective, "batch_specs") else [objective.batch_spec()]
  steps, ahead = steps.compile_ahead(state, specs)
  logging.info("%s", ahead.summary())
  return steps


def _write_lineage(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records which tokenizers made the training data (`lineage.json`), so decode can refuse a
  model paired with a tokenizer or codec it was not trained on."""
  sources = config.data.get("train_sources", ()) if "data" in config else ()
  if jax.process_index() != 0 or "://" in workdir or not sources:
    return
  lineage = fingerprint.lineage_of_sources(sources)
  if lineage:
    fingerprint.write_lineage(workdir, lineage)


def train(config: ml_collections.ConfigDict, workdir: str, return_state: bool = False, *,
          devices: Optional[Sequence] = None, stop_after: Optional[int] = None) -> TrainResult:
  """Runs (or resumes) training until `config.train.steps` or SIGTERM, then exports.

  Args:
    config: the run config (`config_base`; `config.model.kind` picks the objective).
    workdir: run directory.
    return_state: keep the final state in the result (tests).
    devices: the mesh's devices (default all).
    stop_after: stop after this step without a final save or export, as if
      the job were killed there (tests); the schedule still spans `train.steps`.
  """
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  objective = make_objective(config)
  config = objective.prepare(config, workdir)
  data = objective.data_iterator(config, mesh)
  _write_config(workdir, config)
  _write_lineage(workdir, config)
  ckpt = (checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
          if config.checkpoint.enabled else None)
  # The newest intact checkpoint (damaged ones are skipped and moved aside), if any.
  state, restored = ckpt.restore_latest(objective.abstract_state(mesh), data) if ckpt else (None, None)
  if state is not None:
    logging.info("resuming from checkpoint %d", restored)
  else:
    state = objective.create_state(mesh, config.seed)
  step = start_step = int(jax.device_get(state.step))
  steps = _compiled_steps(objective, config, mesh, state)
  logging.info("mesh %s; %s", mesh_lib.describe(mesh), objective.describe(state, config))

  logger = run_logger.RunLogger(workdir, config, objective.progress(config), mesh.devices.size,
                                mesh.devices.flat[0].device_kind, resume_step=start_step)
  profile = metrics_lib.ProfileWindow(workdir, config.logging.profile_start_step,
                                      config.logging.profile_num_steps)
  watcher = checkpointing.PreemptionWatcher(config.checkpoint.save_on_preemption)
  total = config.train.steps
  preempted = killed = False
  started = time.perf_counter()
  local = getattr(data, "local", None)
  try:
    while step < total:
      profile.before_step(step)
      try:
        batch = next(data)
      except StopIteration:
        logging.warning("the input pipeline ran out of data at step %d (data.num_epochs); stopping", step)
        break
      if step == 0:
        state = steps.start(state, batch)
      state, step_metrics = steps(state, batch)
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
  exported = [] if killed else objective.export(state, workdir)
  logging.info("stopped at step %d after %.1f s%s%s", step, time.perf_counter() - started,
               " (preempted)" if preempted else "", f"; wrote {', '.join(exported)}" if exported else "")
  ok, reason = checkpointing.final_status(state.params, trailing_skips(logger.history),
                                          int(config.train.max_consecutive_skips))
  if not ok:
    logging.error("the run failed: %s", reason)
  return TrainResult(final_step=step, start_step=start_step, preempted=preempted, history=logger.history,
                     exported=exported, skipped_files=int(getattr(local, "skipped_files", 0)),
                     state=state if return_state else None, ok=ok, reason=reason)


def trailing_skips(history: Sequence[dict]) -> int:
  """Updates skipped in a row at the end of `history` (any network's: `skipped`, `disc_skipped`)."""
  count = 0
  for values in reversed(history):
    if not (values.get("skipped", 0) or values.get("disc_skipped", 0)):
      break
    count += 1
  return count


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax and Grain (dozens of lines per checkpoint)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/grain/"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  host_memory.run_cpu_programs_inline()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  compilation_cache.enable(FLAGS.compilation_cache_dir)
  from metis_jax.training import demo_job  # pylint: disable=import-outside-toplevel
  if demo_job.is_demo_stage1(FLAGS.config):
    # The default job: stage 1, then both S2A models on the same demo data, so that
    # `decode --model <workdir>` has every part it needs (decode_bundle.json).
    demo_job.run_demo_job(FLAGS.workdir, FLAGS.config, log=lambda s: print(s, flush=True), train=train)
  else:
    result = train(FLAGS.config, FLAGS.workdir)
    if not result.ok:
      print(f"error: the run failed at step {result.final_step}: {result.reason}", file=sys.stderr)
      sys.exit(1)
    if jax.process_index() == 0:
      print(f"done: step {result.final_step}/{FLAGS.config.train.steps}"
            f"{' (preempted)' if result.preempted else ''}; checkpoints in "
            f"{os.path.join(FLAGS.workdir, 'checkpoints')}, metrics in "
            f"{os.path.join(FLAGS.workdir, 'metrics.jsonl')}"
            + (f"; exported {', '.join(result.exported)}" if result.exported else ""), flush=True)


def run_main() -> None:
  """`python -m metis_jax.train` (and its alias `python -m metis_jax.codec_train`)."""
  define_flags()
  app.run(main)
