"""Every batch shape of a run compiled before its first step, so that no step traces or compiles.

A jitted step `(state, batch, *rest) -> ...` compiles once per distinct batch
shape. With length buckets (`data.bucketing`) the shapes are known before
training (`input_pipeline.batch_specs`): `compile_ahead` lowers and compiles
the step for each of them (`jitted.lower(...).compile()`) and returns an
`AheadCompiled`, a callable with the jitted function's signature that runs
the executable of the batch's shapes. The executables are kept (the jit's own
cache is not filled by AOT compiles), so a step never compiles; a batch of a
shape not compiled ahead (a bug in the spec list) is compiled at that step,
with a warning, and counted in `late_compiles`.
"""

import concurrent.futures
import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
from absl import logging

from metis_jax.training import host_memory
from metis_jax.training import metrics as metrics_lib

# Compiles run in threads (XLA releases the GIL); more at once costs host memory.
MAX_PARALLEL_COMPILES = 4


def shape_key(batch: dict[str, Any]) -> tuple:
  """What decides the executable of a batch: each array's name, shape and dtype."""
  return tuple(sorted((name, tuple(x.shape), str(x.dtype)) for name, x in batch.items()))


def describe_spec(spec: dict[str, Any]) -> str:
  """'[8, 256]': the shape of `tokens` (or of the first array) of a batch spec."""
  name = "tokens" if "tokens" in spec else sorted(spec)[0]
  return str(list(spec[name].shape))


def abstract(tree: Any) -> Any:
  """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs with their shardings; None stays None."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


@dataclasses.dataclass(frozen=True)
class BucketCompile:
  """One batch shape compiled ahead.

  Attributes:
    shape: `describe_spec` of it ('[B, T]').
    memory: per-device bytes (`metrics.memory_summary`: argument, output, alias, temp,
      generated_code, total); empty where the backend does not say.
  """
  shape: str
  memory: dict


def largest_bucket(buckets: list[BucketCompile]) -> BucketCompile:
  """The bucket with the most per-device memory (the last one when the backend reports none)."""
  return max(reversed(buckets), key=lambda b: b.memory.get("total", 0))


class AheadCompiled:
  """A jitted step with an executable per batch shape (see the module doc).

  Attributes:
    jitted: the jitted function `(state, batch, *rest)`.
    executables: `shape_key(batch)` -> compiled executable.
    buckets: what was compiled ahead, in spec order.
    seconds: wall time of the compile-ahead.
    late_compiles: batches whose shapes were not compiled ahead (each compiled at its step).
  """

  def __init__(self, jitted: Any, executables: dict, buckets: list[BucketCompile], seconds: float):
    self.jitted, self.executables, self.buckets, self.seconds = jitted, executables, buckets, seconds
    self.late_compiles = 0

  def __call__(self, state: Any, batch: dict[str, jax.Array], *rest: Any):
    key = shape_key(batch)
    executable = self.executables.get(key)
    if executable is None:
      logging.warning("batch %s was not compiled ahead (known: %s); compiling it now",
                      describe_spec(batch), [b.shape for b in self.buckets])
      executable = self.jitted.lower(state, batch, *rest).compile()
      self.executables[key] = executable
      late_temp = metrics_lib.memory_summary(executable).get("temp", 0)
      _settle_host_memory([late_temp] + [b.memory.get("temp", 0) for b in self.buckets], _platform(state))
      self.late_compiles += 1
    return executable(state, batch, *rest)

  def largest(self) -> BucketCompile:
    return largest_bucket(self.buckets)

  def summary(self) -> str:
    """One log line: how many shapes, how long, each bucket's per-device memory, the largest."""
    fmt = lambda b: (f"{b.shape} {metrics_lib.format_bytes(b.memory['total'])}" if b.memory
                     else f"{b.shape} (memory not reported)")
    return (f"compiled the train step ahead for {len(self.buckets)} batch shape(s) in {self.seconds:.1f} s; "
            f"per-device memory: {', '.join(fmt(b) for b in self.buckets)}; largest {fmt(self.largest())}")


def compile_ahead(jitted: Any, state: Any, specs: Sequence[dict[str, Any]], *rest: Any) -> AheadCompiled:
  """Lowers and compiles `jitted(state, batch, *rest)` for every batch spec.

  Args:
    jitted: a `jax.jit` function with explicit in-shardings.
    state: the state the steps start from (arrays or ShapeDtypeStructs with shardings).
    specs: batch specs `{name: ShapeDtypeStruct}` (duplicates are compiled once).
    *rest: the step's further arguments (e.g. frozen parameters), arrays or abstract.

  Returns:
    An `AheadCompiled` holding one executable per distinct spec.
  """
  started = time.perf_counter()
  state, rest = abstract(state), abstract(rest)
  unique = {shape_key(spec): spec for spec in specs}
  lowered = {key: jitted.lower(state, spec, *rest) for key, spec in unique.items()}
  workers = max(1, min(len(lowered), MAX_PARALLEL_COMPILES))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {key: pool.submit(low.compile) for key, low in lowered.items()}
    executables = {key: f.result() for key, f in futures.items()}
  buckets = [BucketCompile(describe_spec(unique[key]), metrics_lib.memory_summary(executables[key]))
             for key in unique]
  _settle_host_memory([b.memory.get("temp", 0) for b in buckets], _platform(state))
  return AheadCompiled(jitted, executables, buckets, time.perf_counter() - started)


def _settle_host_memory(temp_bytes: Sequence[int], platform: Optional[str]) -> None:
  """After compiling: the compiler's freed host memory back to the OS before the steps allocate
  theirs, and on a CPU the steps' temporary buffers (up to the largest of `temp_bytes`) kept in
  the heap."""
  host_memory.release_freed()
  if platform == "cpu":
    host_memory.keep_step_buffers(max(temp_bytes))


def _platform(state: Any) -> Optional[str]:
  """The platform of the devices `state` is sharded over (None where it has no sharding)."""
  for leaf in jax.tree.leaves(state):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      return next(iter(sharding.device_set)).platform
  return None
