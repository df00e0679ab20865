"""Orbax checkpoints of the train state and the data iterator, auto-resume, preemption.

Layout: `<workdir>/checkpoints/<step>/{state, data}`. `state` is the
TrainState (params, optimizer state, step, base RNG, skip counter), written
by every process for its own shards; `data` is the input iterator's position,
one small JSON file per process (Grain's Orbax handler). Saves are
asynchronous: the device-to-host copy happens in `save`, the writing in a
background thread, and a checkpoint only becomes visible once complete.

Restoring takes the *target* shardings from the current mesh, so a run can
resume on a different mesh shape (or number of chips) than it was saved on.
"""

import signal
import threading
from typing import Any, Optional

import grain.checkpoint as grain_checkpoint
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

STATE, DATA = "state", "data"


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


class Checkpointer:
  """Saves every `every_steps`, keeps `keep`, restores the latest.

  Args:
    directory: where checkpoints live (local path or gs://).
    cfg: `config.checkpoint`.
  """

  def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep,
        keep_period=cfg.keep_period or None, enable_async_checkpointing=cfg.async_save,
        create=True)
    self.manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain_checkpoint.CheckpointHandler()})

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
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: grain_checkpoint.CheckpointSave(_FrozenIteratorState(data_iterator))})
    saved = self.manager.save(step, args=args, force=True)
    if saved:
      logging.info("step %d: checkpoint save started", step)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores checkpoint `step` onto the shardings in `abstract_state`.

    Args:
      step: checkpoint step.
      abstract_state: TrainState of `jax.ShapeDtypeStruct` with `sharding`
        (the current mesh's layout; it may differ from the saved one).
      data_iterator: restored in place to its saved position. If the save was
        made with another number of processes, its position cannot be mapped
        and it is left as is (logged).

    Returns:
      The restored TrainState.
    """
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: grain_checkpoint.CheckpointRestore(data_iterator)}))
    except (ValueError, FileNotFoundError) as e:
      if "process_" not in str(e):
        raise
      logging.warning("checkpoint %d: no data-iterator state for %d processes (%s); restoring the "
                      "train state only, the input pipeline starts from its beginning",
                      step, jax.process_count(), e)
      restored = self.manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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

