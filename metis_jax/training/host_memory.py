"""Host memory: hand the heap that compiling freed back to the operating system.

XLA's compiler allocates a few hundred MiB of short-lived host memory per
program (the tiny train step: about 300 MiB at its peak). glibc keeps the freed
pages in the process's heap, so the next allocations (the step's buffers) land
on top of them and the resident set stays at the compile peak plus the step.
`malloc_trim(0)` returns the free pages: measured on the tiny train step
(B 4 x T 500, CPU), the resident set after its compile went from 597 to 359 MiB
and the first step's peak from 762 to 598 MiB.
"""

import ctypes
import ctypes.util
import functools
import resource
from typing import Optional


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    return libc.malloc_trim
  except (OSError, AttributeError, TypeError):
    return None


def resident_bytes() -> Optional[int]:
  """This process's resident set now (Linux `/proc/self/statm`), or None elsewhere."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except (OSError, ValueError, IndexError):
    return None


def release_freed() -> Optional[int]:
  """Returns freed heap pages to the OS; the bytes the resident set shrank by (None: cannot tell)."""
  trim = _malloc_trim()
  if trim is None:
    return None
  before = resident_bytes()
  trim(0)
  after = resident_bytes()
  return None if before is None or after is None else max(before - after, 0)
