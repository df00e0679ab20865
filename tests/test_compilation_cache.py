"""The persistent compilation cache of the train and decode commands (parallel/compilation_cache.py)."""

import io
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from tests import conftest
from tests import train_testlib as lib
from metis_jax import cli_support
from metis_jax.inference import cli as decode_cli
from metis_jax.parallel import compilation_cache


def test_resolve_prefers_the_flag_then_jax_variable_then_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
  assert compilation_cache.resolve(str(tmp_path)) == str(tmp_path)
  assert compilation_cache.resolve("") == ""          # off, whatever the environment says
  assert compilation_cache.resolve("~/c") == os.path.expanduser("~/c")
  assert compilation_cache.resolve(None) is None      # JAX's own variable decides
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation_cache.resolve(None) == str(tmp_path / "metis_jax" / "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compilation_cache.default_dir() == os.path.expanduser("~/.cache/metis_jax/xla")


def test_prune_deletes_the_oldest_entries_down_to_the_limit(tmp_path):
  for age, name in enumerate(["newest", "middle", "oldest"]):
    path = tmp_path / name
    path.write_bytes(b"x" * 100)
    os.utime(path, (1e9 - age * 1000, 1e9 - age * 1000))
  (tmp_path / "a_folder").mkdir()  # not an entry: left alone
  assert compilation_cache.prune(str(tmp_path), 300) == 0
  assert compilation_cache.prune(str(tmp_path), 150) == 200
  assert sorted(os.listdir(tmp_path)) == ["a_folder", "newest"]
  assert compilation_cache.prune("gs://bucket/cache", 0) == 0
  assert compilation_cache.prune(str(tmp_path / "missing"), 0) == 0


def _env_without_session_cache() -> dict:
  """A subprocess environment with the suite's flags but not its JAX_COMPILATION_CACHE_DIR."""
  env = lib.subprocess_env(devices=1)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


_COMPILE_ONCE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from metis_jax.parallel import compilation_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    assert compilation_cache.enable(sys.argv[1]) == sys.argv[1]
    print(float(jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(4.0)).sum()))
    print("hits", len(hits))
""")


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  folder = str(tmp_path / "cache")
  env = _env_without_session_cache()

  def run():
    out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE, folder], env=env, capture_output=True,
                         text=True, timeout=120, cwd=conftest.REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()

  first = run()
  assert first[-2:] == ["hits", "0"]
  assert any(name.startswith("jit_") for name in os.listdir(folder)), os.listdir(folder)
  second = run()
  assert second[-2] == "hits" and int(second[-1]) >= 1  # the jitted function, and jnp's own ops
  assert second[0] == first[0]


def test_a_folder_that_cannot_hold_the_cache(monkeypatch, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  try:
    with pytest.raises(cli_support.UserError, match="--compilation_cache_dir .*a_file/cache: .*writable"):
      compilation_cache.enable(str(blocker / "cache"))
    # The default folder in that state (say, a read-only home) only turns the cache off.
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert compilation_cache.enable(None) == ""
    assert not jax.config.jax_compilation_cache_dir
    stream = io.StringIO()
    assert decode_cli.run_cli(["decode", f"--compilation_cache_dir={blocker}/cache"], stream) == 2
    assert stream.getvalue().startswith("error: --compilation_cache_dir"), stream.getvalue()
  finally:
    compilation_cache.enable(conftest.XLA_CACHE_DIR)
  assert (jax.config.jax_compilation_cache_dir or "") == conftest.XLA_CACHE_DIR
  assert compilation_cache.unusable(str(tmp_path / "new" / "folder")) is None  # created
  assert compilation_cache.unusable("gs://bucket/cache") is None


def test_decode_sets_the_cache_up_from_its_flag(tmp_path):
  folder = str(tmp_path / "decode_cache")
  try:
    decode_cli.start_processes(decode_cli.Args.create(compilation_cache_dir=folder))
    assert jax.config.jax_compilation_cache_dir == folder
    decode_cli.start_processes(decode_cli.Args.create(compilation_cache_dir=""))
    assert not jax.config.jax_compilation_cache_dir
  finally:
    compilation_cache.enable(conftest.XLA_CACHE_DIR)  # the session's cache again
  assert (jax.config.jax_compilation_cache_dir or "") == conftest.XLA_CACHE_DIR


@pytest.mark.slow
def test_train_writes_its_programs_to_the_flag_folder(tmp_path):
  folder = str(tmp_path / "train_cache")
  env = _env_without_session_cache()
  cmd = lib.train_command(str(tmp_path / "run"), "train.steps=2") + [f"--compilation_cache_dir={folder}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=conftest.REPO_ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert any(name.startswith("jit_step") for name in os.listdir(folder)), os.listdir(folder)
