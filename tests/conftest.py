"""Test set-up: 8 fake CPU devices for sharding tests, one JAX compilation cache for the
session (and the processes its tests start), and the shared data folder.

Missing test data (the `../shared` folder beside the checkout, a parity
fixture) or a missing module of the `test` extra skips a test with its reason
locally, and FAILS it when the environment variable CI is true: a CI run must
not be green having run no parity test. Hardware skips (no GPU, no libtpu, no
TensorFlow) stay skips everywhere; use plain `pytest.skip` / `skipif` for those.
"""

import atexit
import os
import shutil
import tempfile


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of the suite and of the processes its tests start: `devices` fake CPU devices and
  backend (LLVM) optimization level 0. XLA:CPU compile time, which dominates most tests here
  (tiny models, a few steps), drops by a third to a half; the slower generated code costs less
  than that even in the longest training tests."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_compilation_cache() -> str:
  """JAX's persistent compilation cache in a fresh temp folder for this session, shared by the
  tests and the `python -m metis_jax...` processes they start (they inherit the environment):
  the many runs of the same tiny configs load their executables instead of recompiling them.
  Every entry is cached (compile time 0 s, any size). A cache folder set by the caller is kept;
  `JAX_COMPILATION_CACHE_DIR=` (empty) turns caching off. The folder is removed at exit."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  folder = tempfile.mkdtemp(prefix="metis_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  return folder


XLA_CACHE_DIR = _session_compilation_cache()

import importlib  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
PARITY = os.path.join(SHARED, "data", "parity")
SPEECH = os.path.join(SHARED, "data", "speech")


IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str):
  """Skips the calling test with `reason`, or fails it under CI=true."""
  if IN_CI:
    pytest.fail(f"{reason} (CI=true: required, not skipped)", pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def require_dir(path: str) -> str:
  """`path` if it is a folder; else skip (fail under CI). Returns the path."""
  if not os.path.isdir(path):
    missing(f"test data folder {path} is absent (it lives in ../shared beside the checkout)")
  return path


def require_file(path: str) -> str:
  """`path` if it is a file; else skip (fail under CI). Returns the path."""
  if not os.path.isfile(path):
    missing(f"test data file {path} is absent (it lives in ../shared beside the checkout)")
  return path


def parity_fixture(name: str, *files: str) -> str:
  """The folder `../shared/data/parity/<name>`, checked to hold `files`."""
  folder = require_dir(os.path.join(PARITY, name))
  for f in files:
    require_file(os.path.join(folder, f))
  return folder


def require_module(name: str, extra: str = "test") -> types.ModuleType:
  """`pytest.importorskip` for a module of one of setup.py's extras: the
  import, or a skip naming the extra (a failure under CI=true)."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    error = e
  missing(f"{name} is not installed ({error}); it comes with pip install -e \".[{extra}]\"")


@pytest.fixture
def parity_dir():
  return require_dir(PARITY)


@pytest.fixture
def speech_dir():
  return require_dir(SPEECH)
