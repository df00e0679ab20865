"""Fault injection: damaged checkpoints, killed runs and launchers, non-finite state.

The multi-process cases share one trained 2-process run (2 x 4 CPU devices,
a checkpoint at every step 1..8). The damage case copies it, drops checkpoint
8 so 7 is the newest, damages 7, 6, 5, 4 and 3 each a different way and
resumes to step 8 (one resumed run walks back through all five). Expected:
the run names each damage in its log, moves each damaged checkpoint aside,
restores 2 (the newest intact one), its losses for steps 3..8 equal the
uninterrupted run's, and it does not hang.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from metis_jax.training import checkpoint_integrity as integrity
from metis_jax.training import checkpointing
from metis_jax.training import metrics as metrics_lib
from tests import train_testlib as lib

LAUNCHER = os.path.join(lib.REPO_ROOT, "launch", "local_multiprocess.py")
STEPS = 8
RUN_OVERRIDES = lib.REFERENCE_MESH + (f"train.steps={STEPS}", "checkpoint.every_steps=1",
                                      f"checkpoint.keep={STEPS}")
RESUME_BOUND_S = 240  # wall clock of one resumed 2-process run, compile included (about 60 s on 2 cores)


# ------------------------------------------------------------------ digests (fast)


def test_digest_is_independent_of_the_sharding_and_sees_one_changed_element():
  x = jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 7.0
  devices = np.array(jax.devices()[:8])
  a = jax.device_put(x, NamedSharding(Mesh(devices.reshape(8), ("d",)), P("d", None)))
  b = jax.device_put(x, NamedSharding(Mesh(devices.reshape(2, 4), ("d", "t")), P("t", "d")))
  tree = {"w": x, "step": jnp.int32(7), "h": x.astype(jnp.bfloat16), "k": jnp.array([1, 2], jnp.uint32)}
  base = integrity.tree_digests(tree)
  assert integrity.tree_digests({"w": a}) == {"['w']": base["['w']"]}
  assert integrity.tree_digests({"w": b}) == {"['w']": base["['w']"]}
  # One flipped bit anywhere, or two elements swapped, changes the digest.
  bits = np.asarray(x).view(np.uint32).copy()
  bits[63, 31] ^= 1
  flipped = dict(tree, w=jnp.asarray(bits.view(np.float32)))
  swapped = dict(tree, w=x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0]))
  for other in (flipped, swapped):
    problems = integrity.compare_digests(base, integrity.tree_digests(other))
    assert len(problems) == 1 and problems[0].startswith("['w']: content digest")
  assert integrity.compare_digests(base, integrity.tree_digests(dict(tree, step=jnp.int32(8))))
  assert integrity.compare_digests(base, base) == []


def test_final_status_refuses_nonfinite_parameters_and_long_skip_runs():
  params = {"a": jnp.ones((3,)), "b": {"c": jnp.zeros((2, 2))}}
  assert checkpointing.final_status(params, 2, 5) == (True, "ok")
  ok, reason = checkpointing.final_status({"a": jnp.ones((3,)), "b": {"c": jnp.full((2, 2), jnp.nan)}}, 0, 5)
  assert not ok and "not finite" in reason and "['b']['c']" in reason
  ok, reason = checkpointing.final_status(params, 6, 5)
  assert not ok and "6 updates" in reason and "train.max_consecutive_skips=5" in reason
  assert checkpointing.final_status(params, 100, 0)[0]  # 0 disables the skip check


# ------------------------------------------------------------------ metrics on resume (fast)


def test_jsonl_writer_drops_lines_past_the_restored_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 10))
                  + '{"step": 10, "lo')  # a line cut by a kill
  writer = metrics_lib.JsonlWriter(str(tmp_path), resume_step=6)
  for s in (7, 8):
    writer.write({"step": s, "loss": -float(s)})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
  assert rows[6]["loss"] == -7.0
  fresh = metrics_lib.JsonlWriter(str(tmp_path / "new"), resume_step=None)
  fresh.write({"step": 1})
  fresh.close()
  assert (tmp_path / "new" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_progress_line_has_an_eta():
  values = {"steps_per_second": 2.0, "tokens_per_second": 1000.0, "loss": 1.0, "accuracy": 0.5,
            "grad_norm": 1.0, "learning_rate": 1e-3, "mfu": 0.1}
  line = metrics_lib.progress_line(100, 1000, values)
  assert "ETA 7m30s" in line  # 900 steps at 2 step/s
  assert "ETA" not in metrics_lib.progress_line(1, 1000, {k: values[k] for k in (
      "loss", "accuracy", "grad_norm", "learning_rate")})


# ------------------------------------------------------------------ the shared 2-process run


def _launch(workdir: str, cache: str, timeout: float, *overrides: str) -> tuple[int, str, float]:
  command = [sys.executable, LAUNCHER, "--num_processes", "2", "--devices_per_process", "4",
             "--timeout", str(timeout), "--"] + lib.train_command(workdir, *RUN_OVERRIDES, *overrides)
  started = time.time()
  out = subprocess.run(command, cwd=lib.REPO_ROOT, env=lib.subprocess_env(devices=4, cache_dir=cache),
                       capture_output=True, text=True, timeout=timeout + 60)
  return out.returncode, out.stdout + out.stderr, time.time() - started


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir of an uninterrupted 8-step 2-process run with checkpoints 1..8; compile cache)."""
  root = tmp_path_factory.mktemp("faults")
  workdir, cache = str(root / "reference"), str(root / "cache")
  code, log, _ = _launch(workdir, cache, 400)
  assert code == 0, log[-4000:]
  assert lib.checkpoint_steps(workdir) == list(range(1, STEPS + 1))
  assert sorted(lib.read_metrics(workdir)) == list(range(1, STEPS + 1))
  return workdir, cache


def _largest(pattern: str) -> str:
  files = [f for f in glob.glob(pattern) if os.path.isfile(f)]
  assert files, pattern
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  # Every data file of process 0 cut in half. Cutting only the largest one once went
  # unnoticed in a loaded full-suite run: the restore verified every array's checksum and
  # resumed from step 6, so whatever it read was intact (why that half was not read is
  # not established).
  paths = [f for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
           if os.path.isfile(f)]
  assert paths
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
  # The largest data file of process 1 holds most of its Adam moments (2/3 of the state).
  path = _largest(os.path.join(step_dir, "state", "ocdbt.process_1", "d", "*"))
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def _delete_array_file(step_dir):
  os.remove(_largest(os.path.join(step_dir, "state", "ocdbt.process_1", "d", "*")))


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _delete_iterator_file(step_dir):
  os.remove(os.path.join(step_dir, "data", "process_0-of-2.json"))


DAMAGE = {
    # name: (damage, a phrase the skip log line must contain)
    "truncated_array_file": (_truncate, "could not read"),
    "flipped_bytes": (_flip_bytes, "content digest"),
    "deleted_array_file": (_delete_array_file, "could not read"),
    "deleted_manifest": (_delete_manifest, "manifest.ocdbt is missing"),
    "deleted_iterator_file": (_delete_iterator_file, "data/process_0-of-2.json is missing"),
}


# The checkpoint each damage is done to: the newest five below the dropped step 8, so one
# resumed run has to detect every one of them, walking back, before it restores step 2.
DAMAGED_STEP = {"truncated_array_file": 7, "flipped_bytes": 6, "deleted_array_file": 5,
                "deleted_manifest": 4, "deleted_iterator_file": 3}
RESTORED = min(DAMAGED_STEP.values()) - 1


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_to_the_newest_intact_one(trained, tmp_path):
  assert sorted(DAMAGED_STEP) == sorted(DAMAGE) and len(set(DAMAGED_STEP.values())) == len(DAMAGE)
  reference, cache = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))  # as if killed after saving 7
  for name, step in DAMAGED_STEP.items():
    DAMAGE[name][0](os.path.join(workdir, "checkpoints", str(step)))

  code, log, seconds = _launch(workdir, cache, RESUME_BOUND_S)
  assert code == 0, log[-4000:]
  assert seconds < RESUME_BOUND_S
  for name, step in DAMAGED_STEP.items():
    phrase = DAMAGE[name][1]
    skip_lines = [line for line in log.splitlines() if f"checkpoint {step} is damaged" in line]
    assert skip_lines and any(phrase in line for line in skip_lines), (name, phrase, skip_lines, log[-3000:])
    # The damaged checkpoint was moved aside (and saved again by the resumed run, below).
    assert glob.glob(os.path.join(workdir, "checkpoints_damaged", f"{step}.*")), name
  assert f"restored checkpoint {RESTORED} " in log, log[-3000:]
  assert not any(f"checkpoint {RESTORED} is damaged" in line for line in log.splitlines())
  assert lib.checkpoint_steps(workdir) == list(range(1, STEPS + 1))

  want = lib.read_metrics(reference)
  got = lib.read_metrics(workdir)
  for step in range(RESTORED + 1, STEPS + 1):
    assert got[step]["loss"] == want[step]["loss"], (step, got[step]["loss"], want[step]["loss"])
  # Each step once in metrics.jsonl (needs loop.py to use metrics.JsonlWriter with resume_step).
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_every_checkpoint_damaged_is_a_clear_error_not_a_hang(trained, tmp_path):
  reference, cache = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  for step in lib.checkpoint_steps(workdir):
    _delete_manifest(os.path.join(workdir, "checkpoints", str(step)))
  code, log, seconds = _launch(workdir, cache, RESUME_BOUND_S)
  assert code != 0 and seconds < RESUME_BOUND_S
  assert "no intact checkpoint at or before step 8" in log, log[-3000:]


# ------------------------------------------------------------------ launcher


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(")")[-1].split()[0] != "Z"


def _children_of(pid: int) -> list[int]:
  out = []
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat) as f:
        fields = f.read().split(")")[-1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.split("/")[2]))
  return out


def _sleeper_launch(tmp_path, script: str, *launcher_flags: str) -> subprocess.Popen:
  command = [sys.executable, LAUNCHER, "--num_processes", "2", "--devices_per_process", "1",
             *launcher_flags, "--", sys.executable, "-c", script]
  return subprocess.Popen(command, cwd=lib.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_for_children(proc, count=2, timeout=30) -> list[int]:
  deadline = time.time() + timeout
  while time.time() < deadline:
    children = _children_of(proc.pid)
    if len(children) >= count:
      return children
    time.sleep(0.05)
  raise AssertionError("the launcher did not start its workers")


def test_killed_launcher_leaves_no_worker_alive(tmp_path):
  proc = _sleeper_launch(tmp_path, "import time; time.sleep(120)")
  workers = _wait_for_children(proc)
  proc.kill()
  proc.wait(timeout=10)
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(w) for w in workers):
    time.sleep(0.05)
  alive = [w for w in workers if _alive(w)]
  for w in alive:
    os.kill(w, signal.SIGKILL)
  assert not alive, "workers outlived a SIGKILLed launcher"


@pytest.mark.slow
def test_a_dying_worker_takes_the_others_down_and_its_status_is_reported(tmp_path):
  script = ("import os, sys, time\n"
            "if os.environ['METIS_PROCESS_ID'] == '1':\n"
            "  time.sleep(1); sys.exit(7)\n"
            "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # a worker deaf to SIGTERM
            "time.sleep(120)\n")
  # A 2 s grace (the default is 10 s) before the deaf worker is SIGKILLed: the same path, 8 s sooner.
  grace_s = 2
  started = time.time()
  proc = _sleeper_launch(tmp_path, script, "--grace_s", str(grace_s))
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 7, out
  assert time.time() - started < grace_s + 20
  assert "process 1 exited with status 7" in out, out
  assert f"SIGKILL after {grace_s} s" in out, out
