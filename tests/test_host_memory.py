"""Freed heap goes back to the OS after compiling, and CPU step buffers stay in the heap
(`training.host_memory`)."""

import os
import resource
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from metis_jax.training import host_memory


def test_freed_fragmented_heap_is_returned():
  if host_memory._libc_function("malloc_trim") is None:  # pylint: disable=protected-access
    pytest.skip("no glibc malloc_trim in this C library")
  host_memory.release_freed()
  # 2 KiB blocks (below malloc's mmap threshold, so they live in the heap); every 16th one
  # stays alive, so glibc cannot shrink the heap from its top by itself.
  blocks = [np.ones(512, np.float32) for _ in range(100_000)]
  kept = blocks[::16]
  del blocks
  released = host_memory.release_freed()
  assert released is not None and released > 100 * 2**20, released
  assert all(float(b.sum()) == 512.0 for b in kept[:100])


def test_resident_bytes_reads_this_process():
  rss = host_memory.resident_bytes()
  if rss is None:
    pytest.skip("no /proc/self/statm")
  assert 10 * 2**20 < rss < 1 << 40


_STEP_BUFFER_PROBE = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    from metis_jax.training import host_memory
    host_memory.run_cpu_programs_inline()
    x = jnp.ones((2000, 4096), jnp.float32)
    step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[-1].sum()).lower(x).compile()
    temp = step.memory_analysis().temp_size_in_bytes

    def faults_per_call():  # the fewest of one call, over 4 (after 2 that may grow the heap)
      counts = []
      for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x).block_until_ready()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      return min(counts[2:])

    mapped = faults_per_call()
    kept = host_memory.keep_step_buffers(temp)
    print(temp, mapped, kept, faults_per_call())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and ru_minflt: Linux")
def test_kept_step_buffers_stop_the_page_faults_of_every_step():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _STEP_BUFFER_PROBE], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  temp, mapped, kept, after = out.stdout.split()
  pages = int(temp) / resource.getpagesize()
  assert int(temp) > 40 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
  assert float(mapped) > 0.5 * pages  # mapped afresh: every page faulted in again
  assert kept == "True"
  assert float(after) < 0.05 * pages


def test_step_buffers_stay_mapped_where_cpu_programs_run_asynchronously():
  # This test process dispatches asynchronously (JAX's default): XLA's threads allocate the
  # buffers, so the thresholds would only hold other memory back.
  assert not host_memory.keep_step_buffers(64 << 20)


def test_step_buffers_past_a_c_int_lift_the_thresholds(monkeypatch):
  # mallopt takes a C int: the base train step's 4 GiB buffer is kept with -1 (glibc: SIZE_MAX).
  calls = []
  monkeypatch.setattr(host_memory, "_libc_function",
                      lambda name: lambda param, value: calls.append((param, value)) or 1)
  dispatch = jax.config.values.get("jax_cpu_enable_async_dispatch", True)
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # read by the CPU client once, at start
  try:
    assert host_memory.keep_step_buffers(4 << 30)
    assert calls == [(host_memory._M_MMAP_THRESHOLD, -1), (host_memory._M_TRIM_THRESHOLD, -1)]
    calls.clear()
    assert host_memory.keep_step_buffers(100 << 20)
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", dispatch)
  assert calls == [(host_memory._M_MMAP_THRESHOLD, 101 << 20), (host_memory._M_TRIM_THRESHOLD, 202 << 20)]
