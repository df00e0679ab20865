"""Host memory: hand the heap that compiling freed back to the operating system, and keep
each CPU step's temporary buffer in the heap instead of mapping it afresh every step.

XLA's compiler allocates a few hundred MiB of short-lived host memory per
program (the tiny train step: about 300 MiB at its peak). glibc keeps the freed
pages in the process's heap, so the next allocations (the step's buffers) land
on top of them and the resident set stays at the compile peak plus the step.
`malloc_trim(0)` returns the free pages: measured on the tiny train step
(B 4 x T 500, CPU), the resident set after its compile went from 597 to 359 MiB
and the first step's peak from 762 to 598 MiB.

XLA:CPU allocates an execution's temporary buffer as one block at its start and
frees it at its end. glibc maps blocks above its mmap threshold (dynamic, at most
32 MiB) with a fresh `mmap` each time, so every step touches every page of it anew:
the tiny train step's 82 MiB cost 21,000 page faults, a fifth of its time.
`keep_step_buffers` raises glibc's thresholds above that size, so the block comes
from the heap and stays there for the next step; it needs the block allocated by
the calling thread's heap, i.e. CPU programs run inline (`run_cpu_programs_inline`,
which the train command sets). Faulting pages in costs about 0.6 s per GiB here
(2-core EPYC): the base train step (B 1 x T 500, a 4 GiB block) went from 13.1-13.6 to
11.7-11.8 s per step with its block kept.
"""

import ctypes
import ctypes.util
import functools
import resource
from typing import Optional

from absl import logging

# glibc's mallopt parameters, and the largest value it takes as a number of bytes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_C_INT_MAX = 2 ** 31 - 1
# mallopt takes a C int, which glibc converts to its size_t threshold: -1 becomes SIZE_MAX,
# i.e. no limit. Step buffers over 2 GiB (the base train step's 4 GiB) are kept that way.
_NO_LIMIT = -1


@functools.lru_cache(maxsize=1)
def _libc_function(name: str):
  """glibc's function `name` (malloc_trim, mallopt), or None where the C library has none."""
  try:
    return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
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
  trim = _libc_function("malloc_trim")
  if trim is None:
    return None
  before = resident_bytes()
  trim(0)
  after = resident_bytes()
  return None if before is None or after is None else max(before - after, 0)


def run_cpu_programs_inline() -> None:
  """Single-device CPU programs run on the calling thread (JAX's `jax_cpu_enable_async_dispatch`
  off), so their temporary buffers come from that thread's heap (`keep_step_buffers`).

  Call it before the first use of a device: JAX reads it when it creates the CPU client. A
  step then returns when it is done; the training loop has no host work worth overlapping
  with a CPU step (the input pipeline runs in its own threads).
  """
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_step_buffers(temp_bytes: int) -> bool:
  """Serves CPU steps' temporary buffers of up to `temp_bytes` from the heap, kept between steps.

  Raises glibc's mmap threshold just above `temp_bytes` and its trim threshold above that
  (see the module doc); past a C int's range both are lifted altogether. Nothing changes
  where CPU programs are dispatched asynchronously (their buffers come from XLA's threads)
  or without glibc.

  Returns:
    True when the thresholds were set.
  """
  import jax  # pylint: disable=import-outside-toplevel
  mallopt = _libc_function("mallopt")
  if (mallopt is None or jax.config.values.get("jax_cpu_enable_async_dispatch", True)
      or temp_bytes <= 0):
    return False
  threshold = temp_bytes + (1 << 20)
  as_c_int = lambda n: n if n <= _C_INT_MAX else _NO_LIMIT
  if not (mallopt(_M_MMAP_THRESHOLD, as_c_int(threshold))
          and mallopt(_M_TRIM_THRESHOLD, as_c_int(2 * threshold))):
    return False
  logging.info("CPU step buffers (%.1f MiB) are kept in the heap between steps", temp_bytes / 2 ** 20)
  return True
