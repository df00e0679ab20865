"""Shared pieces of the trainer tests: a tiny config and subprocess helpers."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax

from metis_jax import config_lib
from tests import conftest
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import state as train_state
from metis_jax.training import step as train_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that compiling dominates: hidden 32, 2 layers, vocab 64,
# 8 sequences of 16 tokens.
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.vocab_size=64",
    "train.seq_length=16", "train.global_batch_size=8", "train.warmup_steps=2",
    "train.learning_rate=3e-3", "train.synthetic_data=True", "logging.log_every_steps=1",
    "logging.tensorboard=False", "mesh.fsdp=-1",
]


# The reference mesh of the sharding tests: every axis split.
REFERENCE_MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


def tiny_config(*overrides: str):
  return config_lib.load_config("tiny", TINY + list(overrides))


@functools.lru_cache(maxsize=None)
def run_steps(overrides: tuple = (), num_devices: int = 1, steps: int = 3):
  """Trains `steps` steps of the tiny config on synthetic batches, in this process.

  Cached: each (overrides, devices) combination compiles once per session.

  Returns:
    (metrics per step as float dicts, final params as numpy, the shardings of
    the freshly created state, the final TrainState).
  """
  config = tiny_config(*overrides)
  setup = train_state.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:num_devices])
  state = train_state.create_sharded_state(setup, mesh, config.seed)
  table = state.params["token_embed"]["embedding"]
  created = {"embedding": table.sharding,
             "mu": state.opt_state[1][0].mu["token_embed"]["embedding"].sharding,
             "shards": {s.data.shape for s in table.addressable_shards}}
  spec = input_pipeline.batch_spec(config)
  step_fn = train_step.jit_train_step(setup, config, mesh, train_state.state_shardings(setup, mesh), spec)
  data = input_pipeline.make_train_iterator(config, mesh, 0, 1)
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, next(data))
    history.append({k: float(v) for k, v in metrics.items()})
  return history, jax.device_get(state.params), created, state


def cli_overrides(*overrides: str) -> list[str]:
  """The same overrides as `--config.a.b=value` flags."""
  return [f"--config.{o}" for o in TINY + list(overrides)]


def subprocess_env(devices: int = 8, cache_dir: str = "") -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = conftest.xla_flags(devices)
  env["JAX_PLATFORMS"] = "cpu"
  for key in ("METIS_COORDINATOR_ADDRESS", "METIS_NUM_PROCESSES", "METIS_PROCESS_ID"):
    env.pop(key, None)
  if cache_dir:
    # Reuse compiled executables across the subprocesses of one test.
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def train_command(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "metis_jax.train", "--config", os.path.join(REPO_ROOT, "configs", "tiny.py"),
          "--workdir", workdir] + cli_overrides(*overrides)


def start_trainer(workdir: str, *overrides: str, cache_dir: str = "", log_path: str = "") -> subprocess.Popen:
  log = open(log_path or os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "a")
  return subprocess.Popen(train_command(workdir, *overrides), cwd=REPO_ROOT,
                          env=subprocess_env(cache_dir=cache_dir), stdout=log, stderr=subprocess.STDOUT)


def run_trainer(workdir: str, *overrides: str, cache_dir: str = "", timeout: float = 240) -> int:
  proc = start_trainer(workdir, *overrides, cache_dir=cache_dir)
  return proc.wait(timeout=timeout)


def read_metrics(workdir: str) -> dict[int, dict]:
  """{step: metrics} from metrics.jsonl; a step written twice (a resumed run) keeps the last."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          values = json.loads(line)
          out[int(values["step"])] = values
  return out


def wait_for_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 180) -> int:
  """Blocks until metrics.jsonl shows `step` (returns the newest step seen)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = read_metrics(workdir)
    if steps and max(steps) >= step:
      return max(steps)
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited with {proc.returncode} before step {step}; "
                           f"log: {log_tail(workdir)}")
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  raise AssertionError(f"no step {step} within {timeout} s; log: {log_tail(workdir)}")


def log_tail(workdir: str, lines: int = 30) -> str:
  path = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log")
  if not os.path.exists(path):
    return "(no log)"
  with open(path) as f:
    return "".join(f.readlines()[-lines:])


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())
