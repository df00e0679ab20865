"""Grouping variable-length items into padded batches of a few static shapes.

Every jitted function compiles once per input shape, so items are padded:
each dimension up to a multiple of its quantum, the batch up to
`batch_size` (with copies of a real row, whose outputs are discarded). Items
are sorted by padded size before being cut into batches, so rows of a batch
are alike and padding stays small; outputs go back to the items' own order.

With several processes each cuts its own items into batches of its rows of
the global batch; `merge_plans` makes the global batches all processes run:
batch k of every process together, padded to the largest of them.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
  """Items `indices` (into the caller's list), padded to `shape` (one size per dimension)."""
  indices: tuple
  shape: tuple


def round_up(n: int, quantum: int) -> int:
  """The smallest multiple of `quantum` >= n (at least one quantum)."""
  return max(quantum, int(math.ceil(n / quantum)) * quantum)


def make_batches(lengths: Sequence[Sequence[int]], batch_size: int,
                 quanta: Sequence[int]) -> list[Batch]:
  """Cuts items into batches of at most `batch_size`.

  Args:
    lengths: per item, its size in each padded dimension.
    batch_size: rows per batch.
    quanta: per dimension, the padding multiple.

  Returns:
    Batches covering every item once; a batch's shape is the elementwise max
    of its items' rounded sizes.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  rounded = [tuple(round_up(int(n), q) for n, q in zip(item, quanta)) for item in lengths]
  order = sorted(range(len(rounded)), key=lambda i: (sum(rounded[i]), rounded[i], i))
  batches = []
  for start in range(0, len(order), batch_size):
    members = tuple(order[start:start + batch_size])
    shape = tuple(max(rounded[i][d] for i in members) for d in range(len(quanta)))
    batches.append(Batch(members, shape))
  return batches


def stack_padded(rows: Sequence[np.ndarray], size: int, batch_size: int, dtype=None) -> np.ndarray:
  """`[batch_size, size, ...]`: each row zero-padded on axis 0; missing rows copy the last one."""
  if not rows:
    raise ValueError("no rows to stack")
  first = np.asarray(rows[0])
  out = np.zeros((batch_size, size) + first.shape[1:], dtype or first.dtype)
  for i in range(batch_size):
    row = np.asarray(rows[min(i, len(rows) - 1)])
    if row.shape[0] > size:
      raise ValueError(f"row of length {row.shape[0]} does not fit in {size}")
    out[i, :row.shape[0]] = row
  return out


def pad_lengths(lengths: Sequence[int], batch_size: int) -> np.ndarray:
  """`[batch_size]` int32 lengths; missing rows repeat the last length."""
  lengths = list(lengths)
  return np.asarray(lengths + [lengths[-1]] * (batch_size - len(lengths)), np.int32)


def merge_plans(plans: Sequence[Sequence[Sequence[int]]]) -> list[tuple[tuple, int]]:
  """Per process, its batches as (padded sizes..., real rows) -> the global batches.

  Args:
    plans: one list per process of `(size_0, ..., size_{d-1}, rows)` rows.

  Returns:
    [(shape, rows)] for k in range(longest plan): the elementwise max of the
    processes' k-th batch shapes and the sum of their rows (a process
    with fewer batches fills batch k with padding rows only).
  """
  longest = max((len(p) for p in plans), default=0)
  merged = []
  for k in range(longest):
    present = [tuple(int(v) for v in p[k]) for p in plans if len(p) > k]
    shape = tuple(max(b[d] for b in present) for d in range(len(present[0]) - 1))
    merged.append((shape, sum(b[-1] for b in present)))
  return merged
