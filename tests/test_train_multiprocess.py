"""Two JAX processes x 4 fake CPU devices over loopback train and checkpoint together."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from metis_jax.training import checkpointing
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import state as train_state
from tests import train_testlib as lib

LAUNCHER = os.path.join(lib.REPO_ROOT, "launch", "local_multiprocess.py")


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_together(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = lib.REFERENCE_MESH + ("train.steps=3", "checkpoint.every_steps=2")
  command = [sys.executable, LAUNCHER, "--num_processes", "2", "--devices_per_process", "4",
             "--timeout", "240", "--"] + lib.train_command(workdir, *overrides)
  env = lib.subprocess_env(devices=4)
  out = subprocess.run(command, cwd=lib.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert "[p1]" in out.stdout and "8 devices" in out.stdout  # one mesh over both processes

  # Both processes wrote their shards and their input position into each checkpoint.
  assert lib.checkpoint_steps(workdir) == [2, 3]
  for process in (0, 1):
    data_file = os.path.join(workdir, "checkpoints", "3", "data", f"process_{process}-of-2.json")
    with open(data_file) as f:
      assert json.load(f) == {"step": 3}
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3", "state", f"ocdbt.process_{process}"))

  # Same losses as one process with the same 8-device mesh (the global batch is the same).
  reference, params, _, _ = lib.run_steps(lib.REFERENCE_MESH, 8)
  logged = lib.read_metrics(workdir)  # process 0 only
  assert sorted(logged) == [1, 2, 3]
  for step, ref in enumerate(reference, start=1):
    assert abs(logged[step]["loss"] - ref["loss"]) < 1e-5, (step, logged[step]["loss"], ref["loss"])

  # The 2-process checkpoint restores into this single process, on another mesh shape.
  config = lib.tiny_config("mesh.fsdp=8")
  setup = train_state.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:8])
  data = input_pipeline.make_train_iterator(config, mesh, 0, 1)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  restored = ckpt.restore(3, train_state.abstract_state(setup, mesh), data)
  ckpt.close()
  assert int(restored.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               jax.device_get(restored.params), params)
