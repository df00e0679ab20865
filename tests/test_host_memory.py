"""Freed heap goes back to the OS after compiling (`training.host_memory`)."""

import numpy as np
import pytest

from metis_jax.training import host_memory


def test_freed_fragmented_heap_is_returned():
  if host_memory._malloc_trim() is None:  # pylint: disable=protected-access
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
