"""The AOT dry run: compiles the real train step for fake CPU devices and (with libtpu) TPU topologies."""

import os
import subprocess
import sys

import pytest

from metis_jax import config_lib
from metis_jax.training import aot_compile as train_compile
from tests import train_testlib as lib

LIBTPU_REASON = ("libtpu is not installed: the TPU dry run needs the TPU compiler "
                 "(pip install 'jax[tpu]', a ~210 MB wheel; no TPU needed)")


def compile_cli(cache_dir: str, *args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "metis_jax.train_compile",
             "--config", os.path.join(lib.REPO_ROOT, "configs", "tiny.py")] + list(args)
  env = lib.subprocess_env(devices=1, cache_dir=cache_dir)
  env.pop("XLA_FLAGS")  # the CLI sets the fake device count itself (--topology cpu-8)
  return subprocess.run(command, cwd=lib.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cpu_dry_run_reports_memory_and_exit_status(tmp_path):
  # The largest bucket only (every bucket: tests/test_compile_ahead.py).
  overrides = ("--largest_bucket_only", *lib.cli_overrides())
  fits = compile_cli(str(tmp_path), "--topology", "cpu-8", *overrides)
  assert fits.returncode == 0, fits.stderr[-3000:]
  assert "mesh data=1 fsdp=8 tensor=1 (8 devices, cpu)" in fits.stdout
  for field in ("argument", "output", "temp", "total", "HBM"):
    assert f"  {field}" in fits.stdout
  assert "-> fits" in fits.stdout
  # The same step (a compilation-cache hit) against a 64 KiB "HBM" must be
  # refused with a non-zero status.
  too_big = compile_cli(str(tmp_path), "--topology", "cpu-8", "--hbm_gib", str(1 / 1024 / 16), *overrides)
  assert too_big.returncode == 1, too_big.stdout + too_big.stderr[-3000:]
  assert "DOES NOT FIT" in too_big.stdout and "more than the 64.0 KiB" in too_big.stderr


@pytest.mark.parametrize("name, chips, topology, wrap", [
    ("v5p-256", 128, "v5:4x4x8", (True, True, True)),
    ("v5p-8", 4, "v5:2x2x1", (False, False, False)),
    ("v4-32", 16, "v4:2x2x4", (False, False, False)),
    ("v5e-16", 16, "v5e:4x4", (False, False, False)),
    ("v6e-256", 256, "v6e:16x16", (True, True, False)),
])
def test_topology_names(name, chips, topology, wrap):
  target = train_compile.parse_topology(name)
  assert (target.num_devices, target.topology_name, target.wrap) == (chips, topology, wrap)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-24", "tpu-8", "v5e-3", "h100-8"])
def test_unknown_topologies_are_errors(name):
  with pytest.raises(ValueError):
    train_compile.parse_topology(name)


@pytest.mark.skipif(not train_compile.libtpu_available(), reason=LIBTPU_REASON)
def test_tpu_dry_run_compiles_the_tiny_config_for_a_small_slice():
  config = config_lib.load_config("tiny")
  report = train_compile.dry_run(config, "v5p-8")
  assert report.mesh.startswith("data=1 fsdp=4 tensor=1 (4 devices, TPU v5")
  assert 0 < report.memory["total"] < report.hbm_bytes and report.fits
