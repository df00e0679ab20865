"""Checkpoints: exact resume after SIGKILL, save-and-exit on SIGTERM, restore onto another
mesh, non-finite updates skipped and never saved."""

import os
import signal

import jax
import numpy as np
import pytest

from metis_jax.training import checkpointing
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import loop as train
from metis_jax.training import state as train_state
from tests import train_testlib as lib


def restore(workdir, step, config, devices):
  """(state, data iterator) of checkpoint `step` restored onto `config.mesh` over `devices`."""
  setup = train_state.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  data = input_pipeline.make_train_iterator(config, mesh, 0, 1)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  try:
    return ckpt.restore(step, train_state.abstract_state(setup, mesh), data), data
  finally:
    ckpt.close()


@pytest.mark.slow
def test_restore_onto_a_different_mesh_gives_the_same_parameters(tmp_path):
  _, params, _, state = lib.run_steps(lib.REFERENCE_MESH, 8)  # data=2 fsdp=2 tensor=2
  config = lib.tiny_config(*lib.REFERENCE_MESH)
  workdir = str(tmp_path)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  data = input_pipeline.make_train_iterator(config, mesh_lib.create_mesh(config.mesh), 0, 1)
  for _ in range(3):
    next(data)
  assert ckpt.save(3, state, data, force=True)
  ckpt.close()

  for overrides, devices in ((("mesh.fsdp=4", "mesh.tensor=2"), 8), (("mesh.fsdp=1",), 1)):
    target = lib.tiny_config(*overrides)
    restored, data = restore(workdir, 3, target, jax.devices()[:devices])
    assert restored.params["to_logits"]["kernel"].sharding.mesh.devices.size == devices
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state),
                 jax.device_get(state.opt_state))
    assert int(restored.step) == 3
    np.testing.assert_array_equal(restored.rng, jax.device_get(state.rng))
    assert data.local.step == 3  # the input position came back too


@pytest.mark.slow
def test_nonfinite_update_is_skipped_counted_and_never_saved(tmp_path):
  workdir = str(tmp_path)
  config = lib.tiny_config("train.steps=3", "train.inject_nan_at_step=2", "checkpoint.every_steps=1")
  result = train.train(config, workdir, return_state=True)
  assert [h["skipped"] for h in result.history] == [0.0, 1.0, 0.0]
  assert np.isnan(result.history[1]["grad_norm"])
  assert int(result.state.skipped_steps) == 1 and int(result.state.step) == 3
  assert lib.checkpoint_steps(workdir) == [1, 2, 3]
  one, _ = restore(workdir, 1, config, jax.devices()[:8])
  two, _ = restore(workdir, 2, config, jax.devices()[:8])
  three, _ = restore(workdir, 3, config, jax.devices()[:8])
  # The skipped step left parameters and optimizer state exactly as they were.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(two.params), jax.device_get(one.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(two.opt_state), jax.device_get(one.opt_state))
  assert not np.array_equal(three.params["to_logits"]["kernel"], two.params["to_logits"]["kernel"])
  assert int(two.skipped_steps) == 1 and int(three.opt_state[1][0].count) == 2
  assert bool(checkpointing.all_finite(three.params))


@pytest.mark.slow
def test_a_state_with_nonfinite_parameters_is_not_saved(tmp_path):
  _, _, _, state = lib.run_steps(lib.REFERENCE_MESH, 8)
  poisoned = state.replace(params=jax.tree.map(lambda x: x.at[0].set(np.nan) if x.ndim else x, state.params))
  config = lib.tiny_config(*lib.REFERENCE_MESH)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), config.checkpoint)
  data = input_pipeline.make_train_iterator(config, mesh_lib.create_mesh(config.mesh), 0, 1)
  assert not ckpt.save(5, poisoned, data, force=True)
  assert ckpt.save(6, state, data, force=True)
  ckpt.close()
  assert lib.checkpoint_steps(str(tmp_path)) == [6]


KILL_RUN = ("train.steps=40", "checkpoint.every_steps=5")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  assert lib.run_trainer(workdir, *KILL_RUN, cache_dir=cache_dir) == 0, lib.log_tail(workdir)
  losses = {s: m["loss"] for s, m in lib.read_metrics(workdir).items()}
  assert sorted(losses) == list(range(1, 41))
  return losses


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, cache_dir,
                                                                          uninterrupted):
  workdir = str(tmp_path / "run")
  proc = lib.start_trainer(workdir, *KILL_RUN, cache_dir=cache_dir)
  lib.wait_for_step(workdir, 12, proc)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  killed_at = max(lib.read_metrics(workdir))
  assert 12 <= killed_at < 40, "the run finished before it could be killed"
  saved = lib.checkpoint_steps(workdir)
  assert saved and max(saved) < 40

  assert lib.run_trainer(workdir, *KILL_RUN, cache_dir=cache_dir) == 0, lib.log_tail(workdir)
  assert "resuming from checkpoint" in lib.log_tail(workdir, 400)
  resumed = {s: m["loss"] for s, m in lib.read_metrics(workdir).items()}
  assert resumed == uninterrupted  # exact float equality, every step


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  proc = lib.start_trainer(workdir, *KILL_RUN, cache_dir=cache_dir)
  lib.wait_for_step(workdir, 7, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, lib.log_tail(workdir)
  stopped_at = max(lib.read_metrics(workdir))
  assert stopped_at < 40, "the run finished before SIGTERM arrived"
  # Periodic saves every 5 steps plus the preemption save at the stop, the newest
  # checkpoint.keep (3, the default) of them kept.
  periodic = set(range(5, stopped_at + 1, 5))
  assert lib.checkpoint_steps(workdir) == sorted(periodic | {stopped_at})[-3:]
  assert "preemption: saving step" in lib.log_tail(workdir, 400)
