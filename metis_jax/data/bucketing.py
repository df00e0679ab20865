"""Length buckets without a collective: a schedule of padded lengths every host computes alike.

Token batches are padded to one of a few bucket lengths so the train step
compiles once per bucket. With several JAX processes, the global array of a
step needs one length on every host. The bucket of each step is therefore
decided by a schedule that depends only on the config, never on this host's
data, so no host has to ask the others (no per-step `process_allgather`):

  * A *length sample*: the lengths of the first `SAMPLE_SIZE` kept elements
    of the global (unsliced) element stream, read once when the iterator is
    built. Every host reads the same records, so every host gets the same
    sample (a single bucket needs no sample).
  * Batches come in windows of `W = data.bucket_window` batches. Each host
    reads `W x b` of its own elements, sorts them by length and cuts them into
    W groups of b rows, shortest first. Group i is padded to the bucket of the
    sample's (i + 1) / W quantile: the length such a group needs on average.
  * The W groups are emitted in the order `permutation(W)` drawn from
    `(data.seed, window index)`, so the padded length of step s is a function
    of (seed, s) and the sample: identical on every host, and after a resume.

A row longer than its group's length (this host's window ran longer than the
sample predicted) is cropped to it at a random offset drawn from
(seed, window, group); shorter rows are padded. Compared with padding each
group to its own longest row (the former behaviour, which needed the
all-gather), batches hold the same records in the same order; only the
padded length may differ and, for a few rows a window, the crop is shorter
than `train.seq_length`. `BucketSchedule.lengths()` lists every length the
schedule can produce (the trainer compiles them all before the first step).

Checkpoint state of the batching iterator: the parent's state at the start
of the current window, the window's index and how many of its batches were
emitted (the same keys as before the schedule); a restore re-reads that
window and skips the emitted batches.
"""

import math
from typing import Any, Optional, Sequence

import grain
import numpy as np

# Kept elements whose lengths define the schedule's quantiles.
SAMPLE_SIZE = 512
# Reading stops after this many records per sampled element (min_length drops too many).
_SAMPLE_READ_FACTOR = 16


def default_buckets(max_length: int, num: int = 4) -> tuple[int, ...]:
  """`num` equal steps up to max_length: 1024 -> (256, 512, 768, 1024)."""
  return tuple(sorted({max(1, math.ceil(max_length * (i + 1) / num)) for i in range(num)}))


def check_buckets(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
  buckets = tuple(int(b) for b in buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
    raise ValueError(f"bucket_lengths {buckets} must be increasing positive integers")
  if buckets[-1] != max_length:
    raise ValueError(f"the last bucket length {buckets[-1]} must equal the crop length {max_length}")
  return buckets


def crop_element(element: dict[str, Any], length: int, rng: np.random.Generator) -> dict[str, Any]:
  """Crops 'tokens' `[T]` (and 'acoustic_tokens' `[T, Q]`, same offset) to at most `length`."""
  tokens = element["tokens"]
  if len(tokens) <= length:
    return element
  start = int(rng.integers(0, len(tokens) - length + 1))
  cut = slice(start, start + length)
  element = dict(element, tokens=tokens[cut])
  if "acoustic_tokens" in element:
    element["acoustic_tokens"] = element["acoustic_tokens"][cut]
  return element


def pad_batch(seqs: Sequence[np.ndarray], batch_size: int, length: int,
              acoustic: Optional[Sequence[np.ndarray]] = None) -> dict[str, np.ndarray]:
  """Pads sequences into {'tokens' int32 [batch_size, length], 'valid' bool [...]}.

  Rows beyond len(seqs) are all padding (valid False). `acoustic` (one
  `[T_i, Q]` array per sequence, T_i = len(seqs[i])) adds 'acoustic_tokens'
  int32 [batch_size, length, Q].
  """
  tokens = np.zeros((batch_size, length), np.int32)
  valid = np.zeros((batch_size, length), bool)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
    valid[r, :len(s)] = True
  out = {"tokens": tokens, "valid": valid}
  if acoustic is not None:
    codes = np.zeros((batch_size, length, acoustic[0].shape[1]), np.int32)
    for r, a in enumerate(acoustic):
      codes[r, :len(a)] = a
    out["acoustic_tokens"] = codes
  return out


def sample_lengths(elements: grain.MapDataset, size: int = SAMPLE_SIZE) -> np.ndarray:
  """int `[n]`, n <= size: lengths of the first kept elements of `elements` (dropped ones are None)."""
  out = []
  for i in range(min(len(elements), size * _SAMPLE_READ_FACTOR)):
    element = elements[i]
    if element is not None:
      out.append(len(element["tokens"]))
      if len(out) == size:
        break
  if not out:
    raise ValueError(f"none of the first {min(len(elements), size * _SAMPLE_READ_FACTOR)} records is kept "
                     "(data.min_length is longer than the data?)")
  return np.asarray(out, np.int64)


class BucketSchedule:
  """The padded length of every batch, from the config only (see the module doc).

  Args:
    buckets: increasing bucket lengths.
    lengths: the length sample (ignored with a single bucket).
    window: batches per window (`data.bucket_window`).
    seed: `data.seed`.
  """

  def __init__(self, buckets: Sequence[int], lengths: Sequence[int], window: int, seed: int):
    self.buckets = tuple(int(b) for b in buckets)
    self.sample = np.sort(np.asarray(lengths, np.int64))
    if len(self.buckets) > 1 and not len(self.sample):
      raise ValueError("a schedule over several buckets needs a length sample")
    self.window = max(1, int(window))
    self.seed = int(seed)

  def bucket_of(self, length: int) -> int:
    """The smallest bucket holding `length` tokens."""
    for b in self.buckets:
      if b >= length:
        return b
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {self.buckets[-1]}")

  def group_lengths(self, num_groups: int) -> tuple[int, ...]:
    """Padded length of each of `num_groups` length-sorted groups, shortest group first."""
    if len(self.buckets) == 1:
      return (self.buckets[0],) * num_groups
    m = len(self.sample)
    quantile = lambda i: self.sample[min(m - 1, -(-(i + 1) * m // num_groups) - 1)]
    return tuple(self.bucket_of(int(quantile(i))) for i in range(num_groups))

  def order(self, window_index: int, num_groups: int) -> np.ndarray:
    """`[num_groups]`: the group emitted at each position of window `window_index`."""
    return np.random.default_rng([self.seed, window_index]).permutation(num_groups)

  def window_lengths(self, window_index: int, num_groups: Optional[int] = None) -> list[int]:
    """Padded lengths of the batches of a window, in emission order."""
    n = self.window if num_groups is None else num_groups
    lengths = self.group_lengths(n)
    return [lengths[g] for g in self.order(window_index, n)]

  def length_at(self, step: int) -> int:
    """Padded length of batch `step` (0-based) of an endless stream."""
    return self.window_lengths(step // self.window)[step % self.window]

  def lengths(self) -> tuple[int, ...]:
    """Every padded length this schedule can produce (full windows and shorter last ones)."""
    return tuple(sorted({t for n in range(1, self.window + 1) for t in self.group_lengths(n)}))

  def to_dict(self) -> dict[str, Any]:
    return {"buckets": list(self.buckets), "window": self.window, "seed": self.seed,
            "group_lengths": list(self.group_lengths(self.window))}


class BucketBatchIterDataset(grain.IterDataset):
  """Sorts windows of elements by length and pads (or crops) batches to the schedule's lengths."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, schedule: BucketSchedule,
               keep_ids: bool = False):
    super().__init__(parent)
    self.batch_size = batch_size
    self.schedule = schedule
    self.keep_ids = keep_ids

  def __iter__(self) -> "BucketBatchIterator":
    return BucketBatchIterator(self._parent.__iter__(), self)

  def __str__(self):
    return (f"BucketBatchIterDataset(batch_size={self.batch_size}, buckets={self.schedule.buckets}, "
            f"window={self.schedule.window})")


class BucketBatchIterator(grain.DatasetIterator):
  """Iterator of `BucketBatchIterDataset`.

  State: the parent's state at the start of the current window, the window's
  number and how many of its batches were emitted. Restoring re-reads that
  window from the parent (deterministic) and skips the emitted batches.
  """

  def __init__(self, parent: grain.DatasetIterator, ds: BucketBatchIterDataset):
    super().__init__(parent)
    self._ds = ds
    self._window_start = parent.get_state()
    self._window_index = 0
    self._batches: Optional[list[dict[str, Any]]] = None
    self._emitted = 0

  def _read_window(self) -> list[dict[str, Any]]:
    ds, schedule = self._ds, self._ds.schedule
    elems = []
    for _ in range(schedule.window * ds.batch_size):
      try:
        elems.append(next(self._parent))
      except StopIteration:
        break
    if not elems:
      return []
    order = sorted(range(len(elems)), key=lambda i: (len(elems[i]["tokens"]), i))
    groups = [order[s:s + ds.batch_size] for s in range(0, len(order), ds.batch_size)]
    lengths = schedule.group_lengths(len(groups))
    batches = []
    for g in schedule.order(self._window_index, len(groups)):
      rng = np.random.default_rng([schedule.seed, self._window_index, int(g), 1])
      rows = [crop_element(elems[i], lengths[g], rng) for i in groups[g]]
      acoustic = [r["acoustic_tokens"] for r in rows] if "acoustic_tokens" in rows[0] else None
      batch = pad_batch([r["tokens"] for r in rows], ds.batch_size, lengths[g], acoustic)
      if ds.keep_ids:
        batch["ids"] = [r.get("id") for r in rows]
      batches.append(batch)
    return batches

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    if self._batches is not None and self._emitted == len(self._batches):
      self._window_index += 1
      self._batches = None
    if self._batches is None:
      self._window_start = self._parent.get_state()
      self._batches = self._read_window()
      self._emitted = 0
      if not self._batches:
        self._batches = None
        raise StopIteration
    batch = self._batches[self._emitted]
    self._emitted += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._batches is not None and self._emitted == len(self._batches):
      return {"parent": self._parent.get_state(), "window_index": self._window_index + 1, "emitted": 0}
    if self._batches is None:
      return {"parent": self._parent.get_state(), "window_index": self._window_index, "emitted": 0}
    return {"parent": self._window_start, "window_index": self._window_index, "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._window_index = int(state["window_index"])
    self._batches = None
    self._emitted = 0
    if int(state["emitted"]) > 0:
      self._window_start = state["parent"]
      self._batches = self._read_window()
      self._emitted = int(state["emitted"])
