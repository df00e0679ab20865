"""Orbax checkpoints of the train state and the data iterator, auto-resume, preemption.

Layout: `<workdir>/checkpoints/<step>/{state, data}`. `state` is the
TrainState (params, optimizer state, step, base RNG, skip counter), written
by every process for its own shards; `data` is the input iterator's position,
one small JSON file per process (Grain's Orbax handler). Saves are
asynchronous: the device-to-host copy happens in `save`, the writing in a
background thread, and a checkpoint only becomes visible once complete.

Restoring takes the *target* shardings from the current mesh, so a run can
resume on a different mesh shape (or number of chips) than it was saved on.

Integrity (`checkpoint_integrity.py`): every checkpoint also holds
`integrity/process_<i>-of-<n>.json`, one per process (the completeness
record), each with a 64-bit digest of every array of the state computed on
the devices at save time (mesh-independent). `restore` walks back from the
requested step to the newest checkpoint that is complete for every process,
loads on every process, matches the digests and is finite; every process
agrees on each verdict through the coordination service with a bounded
timeout. Damaged checkpoints newer than the one restored are moved to
`<checkpoints>_damaged/` so later saves of those steps stay consistent.
"""

import signal
import threading
import time
from typing import Any, Optional

import grain.checkpoint as grain_checkpoint
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from metis_jax.training import checkpoint_integrity as integrity
from metis_jax.training.checkpoint_integrity import CheckpointError  # pylint: disable=unused-import

STATE, DATA, INTEGRITY = "state", "data", integrity.INTEGRITY
# How long a process waits for the others' verdict on a checkpoint (each
# exchange) before the restore fails with a reason; `checkpoint.restore_timeout_s`
# overrides it. Long enough for the slowest process to load a large state.
DEFAULT_RESTORE_TIMEOUT_S = 600.0


class _FrozenIteratorState:
  """The iterator's state captured at save time (the save may finish later)."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self):
    return self._state


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """bool scalar: every float leaf of `tree` is free of NaN and Inf."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


@jax.jit
def _finite_leaves(tree: Any) -> jax.Array:
  """bool [num float leaves]: which float leaves are free of NaN and Inf."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves) if leaves else jnp.ones((0,), bool)


def nonfinite_paths(tree: Any) -> list[str]:
  """Key paths of the float leaves of `tree` holding NaN or Inf ([] = all finite)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [jax.tree_util.keystr(p) for p, x in flat if jnp.issubdtype(x.dtype, jnp.floating)]
  ok = _finite_leaves(tree)
  ok = ok.addressable_data(0) if isinstance(ok, jax.Array) and not ok.is_fully_addressable else ok
  return [p for p, fine in zip(paths, jax.device_get(ok)) if not fine]


def final_status(params: Any, consecutive_skips: int, max_consecutive_skips: int) -> tuple[bool, str]:
  """Whether a finished run may exit 0: (ok, reason).

  Not ok when the final parameters hold NaN/Inf, or when the run ended after
  more than `max_consecutive_skips` updates in a row were skipped for a
  non-finite loss or gradient (0 or less disables that check). Collective
  on multi-process arrays (every process must call it).

  Args:
    params: the final parameters (a pytree of arrays).
    consecutive_skips: updates skipped in a row at the end of the run.
    max_consecutive_skips: `train.max_consecutive_skips`.
  """
  bad = nonfinite_paths(params)
  if bad:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return False, f"the final parameters are not finite ({', '.join(bad[:3])}{more})"
  if max_consecutive_skips > 0 and consecutive_skips > max_consecutive_skips:
    return False, (f"the last {consecutive_skips} updates were all skipped for a non-finite loss or "
                   f"gradient (train.max_consecutive_skips={max_consecutive_skips}); the run diverged")
  return True, "ok"


class Checkpointer:
  """Saves every `every_steps`, keeps `keep`, restores the latest.

  Args:
    directory: where checkpoints live (local path or gs://).
    cfg: `config.checkpoint`.
  """

  def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    self.directory = directory
    self.timeout_s = float(cfg.get("restore_timeout_s", DEFAULT_RESTORE_TIMEOUT_S))
    self.skipped: list[tuple[int, str]] = []  # (step, reason) of the last restore's walk back
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep,
        keep_period=cfg.keep_period or None, enable_async_checkpointing=cfg.async_save,
        create=True)
    self.manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain_checkpoint.CheckpointHandler(),
                       INTEGRITY: integrity.IntegrityHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Every `every_steps` steps (Orbax alone would also save the first step)."""
    return step > 0 and step % self.cfg.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any, force: bool = False) -> bool:
    """Saves `state` (and the iterator position) as checkpoint `step` if due.

    A state with any non-finite parameter is never saved (logged instead),
    so the latest checkpoint is always one to resume from.

    Returns:
      Whether a save was started.
    """
    if not (force or self.should_save(step)):
      return False
    if step in self.manager.all_steps():
      return False
    if not bool(all_finite(state.params)):
      logging.error("step %d: parameters are not finite; NOT saving this checkpoint", step)
      return False
    # Digests on the devices before the state is handed to Orbax (and, after
    # this call returns, donated to the next step).
    record = {"format": integrity.FORMAT, "step": int(step), "arrays": integrity.tree_digests(state)}
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: grain_checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator)),
        INTEGRITY: integrity.IntegritySave(record)})
    saved = self.manager.save(step, args=args, force=True)
    if saved:
      logging.info("step %d: checkpoint save started", step)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores checkpoint `step`, or the newest intact one before it, onto `abstract_state`'s shardings.

    Walks back from `step` (see `restore_latest`); the restored state's
    `step` says which checkpoint it is.

    Args:
      step: the newest checkpoint step to consider.
      abstract_state: TrainState of `jax.ShapeDtypeStruct` with `sharding`
        (the current mesh's layout; it may differ from the saved one).
      data_iterator: restored in place to its saved position. If the save was
        made with another number of processes, its position cannot be mapped
        and it is left as is (logged).

    Returns:
      The restored TrainState.

    Raises:
      CheckpointError: no checkpoint at or before `step` is intact (every
        reason is in the message), or the processes could not agree.
    """
    state, _ = self._restore_walking_back(step, abstract_state, data_iterator)
    if state is None:
      raise CheckpointError(self._nothing_intact_message(step))
    return state

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Optional[Any], Optional[int]]:
    """(state, step) of the newest intact checkpoint, or (None, None) if there is none at all.

    Raises:
      CheckpointError: checkpoints exist but none is intact, or the processes
        could not agree.
    """
    latest = self.latest_step()
    if latest is None:
      return None, None
    state, step = self._restore_walking_back(latest, abstract_state, data_iterator)
    if state is None:
      raise CheckpointError(self._nothing_intact_message(latest))
    return state, step

  def _nothing_intact_message(self, step: int) -> str:
    reasons = "; ".join(f"step {s}: {r}" for s, r in self.skipped) or "none found"
    return (f"no intact checkpoint at or before step {step} in {self.directory} ({reasons}); "
            "move the damaged step folders away to start from scratch")

  def _restore_walking_back(self, newest: int, abstract_state: Any, data_iterator: Any):
    """(state, step) of the newest intact checkpoint <= `newest`, or (None, None); logs what it skips.

    Three collective verdicts per candidate, each agreed by every process
    before going on: complete (files, before loading), loaded (no read
    error), verified (digests match, finite). Any process's failure skips the
    candidate on all of them.
    """
    started = time.perf_counter()
    self.skipped = []
    candidates = sorted((s for s in self.manager.all_steps() if s <= newest), reverse=True)
    count = jax.process_count()
    inspections = {s: integrity.inspect_step(self._step_dir(s), STATE, DATA, count) for s in candidates}
    verdicts = integrity.agree("complete", {str(s): i.problems for s, i in inspections.items()},
                               self.timeout_s)
    restored, chosen = None, None
    for s in candidates:
      problems = [f"process {p}: {x}" if count > 1 else x
                  for p, v in enumerate(verdicts) for x in v.get(str(s), ["not seen by this process"])]
      if not problems:
        restored, problem = self._load_and_verify(s, inspections[s], abstract_state, data_iterator)
        if problem is None:
          chosen = s
          break
        problems = [problem]
      reason = _dedupe(problems)
      self.skipped.append((s, reason))
      logging.warning("checkpoint %d is damaged and is skipped: %s", s, reason)
    if chosen is not None:
      for note in inspections[chosen].notes:
        logging.warning("checkpoint %d: %s", chosen, note)
      if self.skipped:
        logging.warning("restored checkpoint %d in %.1f s after skipping damaged checkpoint(s) %s",
                        chosen, time.perf_counter() - started, ", ".join(str(s) for s, _ in self.skipped))
      else:
        logging.info("restored checkpoint %d in %.1f s", chosen, time.perf_counter() - started)
      self._move_aside([s for s, _ in self.skipped if s > chosen])
    return restored, chosen

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _load_and_verify(self, step: int, inspection: integrity.Inspection, abstract_state: Any,
                       data_iterator: Any) -> tuple[Optional[Any], Optional[str]]:
    """(state, None) if checkpoint `step` loads on every process and matches its record, else (None, reason)."""
    with_data = inspection.saved_process_count == jax.process_count()
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items[DATA] = grain_checkpoint.CheckpointRestore(data_iterator)
    try:
      state, error = self.manager.restore(step, args=ocp.args.Composite(**items))[STATE], None
    except Exception as e:  # pylint: disable=broad-except
      state, error = None, f"{type(e).__name__}: {_first_line(e)}"
    errors = integrity.agree("loaded", error, self.timeout_s)
    failed = [(p, e) for p, e in enumerate(errors) if e is not None]
    if failed:
      return None, "; ".join(f"process {p} could not read it ({e})" for p, e in failed)
    # Every process holds its part: the checks below are collective computations.
    problems = []
    if inspection.digests is not None:
      problems = integrity.compare_digests(inspection.digests, integrity.tree_digests(state))
    bad = nonfinite_paths(state)
    if bad:
      problems.append(f"the restored state is not finite ({', '.join(bad[:3])})")
    verdicts = integrity.agree("verified", problems[:5], self.timeout_s)
    if any(verdicts):
      return None, _dedupe([x for v in verdicts for x in v])
    return state, None

  def _move_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints newer than the restored one out of the manager's folder.

    Otherwise a later save of the same step would be refused (the step
    exists) and the damaged one would count against `keep`. Process 0 moves;
    every process then waits for it (bounded) and reloads the step list.
    """
    if not steps:
      return
    error = None
    if jax.process_index() == 0:
      target_root = epath.Path(str(self.directory).rstrip("/") + "_damaged")
      try:
        target_root.mkdir(parents=True, exist_ok=True)
        for s in steps:
          target = target_root / f"{s}.{int(time.time())}"
          self._step_dir(s).rename(target)
          logging.warning("moved damaged checkpoint %d to %s", s, target)
      except OSError as e:
        error = f"{type(e).__name__}: {_first_line(e)}"
        logging.warning("could not move damaged checkpoints %s aside (%s)", steps, error)
    integrity.agree("moved", error, self.timeout_s)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _dedupe(items: list[str]) -> str:
  return "; ".join(dict.fromkeys(items))


class PreemptionWatcher:
  """Tells the train loop when to save and stop after SIGTERM.

  Multi-process jobs use JAX's preemption sync (the coordination service
  catches SIGTERM on any host and agrees on one step for all); a single
  process installs its own SIGTERM handler.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    self._previous = None
    if enabled and not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: will save a checkpoint and exit after this step")
    self._flag.set()

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop (call once per step, on every process)."""
    if not self.enabled:
      return False
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

