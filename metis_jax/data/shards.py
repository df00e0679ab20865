"""ArrayRecord shards: written with `group_size:1`, visible only when complete.

A shard `NAME.array_record` is first written as `NAME.array_record.tmp`, then
renamed (atomic on POSIX file systems), so a reader or a resumed job never sees
a half-written shard. `group_size:1` makes every record its own chunk: random
access (what Grain's global shuffle does) then reads one record, not hundreds.
"""

import glob
import os
from typing import Iterable, Sequence

from array_record.python import array_record_module

SHARD_SUFFIX = ".array_record"
TMP_SUFFIX = ".tmp"
WRITER_OPTIONS = "group_size:1"


def shard_name(index: int, count: int, prefix: str = "tokens") -> str:
  """`tokens-00003-of-00010.array_record`: the file of work unit `index`."""
  return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes records to `path` atomically (tmp file, then rename).

  Args:
    path: final path, ending in `.array_record`.
    records: serialized records.

  Returns:
    The number of records written.
  """
  if not path.endswith(SHARD_SUFFIX):
    raise ValueError(f"shard path {path!r} must end with {SHARD_SUFFIX}")
  tmp = path + TMP_SUFFIX
  if os.path.exists(tmp):
    os.remove(tmp)  # Left behind by a killed run.
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  count = 0
  try:
    for rec in records:
      writer.write(rec)
      count += 1
  finally:
    writer.close()
  os.rename(tmp, path)
  return count


def write_text_atomic(path: str, text: str) -> None:
  """Writes a small text file through a tmp file and a rename."""
  tmp = path + TMP_SUFFIX
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.rename(tmp, path)


def list_shards(spec: str) -> list[str]:
  """Shard files of a source: a directory, a glob pattern or one file; sorted.

  Raises:
    FileNotFoundError: nothing matches.
  """
  if os.path.isdir(spec):
    paths = glob.glob(os.path.join(spec, "*" + SHARD_SUFFIX))
  elif any(c in spec for c in "*?["):
    paths = glob.glob(spec)
  else:
    paths = [spec] if os.path.exists(spec) else []
  paths = sorted(p for p in paths if p.endswith(SHARD_SUFFIX) or "array_record-" in p)
  if not paths:
    raise FileNotFoundError(f"no ArrayRecord shards at {spec!r}")
  return paths


def read_all(paths: Sequence[str]) -> list[bytes]:
  """Every record of the given shards, in order (for tests and small tools)."""
  out = []
  for p in paths:
    reader = array_record_module.ArrayRecordReader(p)
    try:
      out.extend(reader.read_all())
    finally:
      reader.close()
  return out


def num_records(path: str) -> int:
  """Records in one shard."""
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def check_group_size_one(path: str) -> bool:
  """True if the shard was written with group_size:1 (fast random access)."""
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return "group_size:1" in reader.writer_options_string().split(",")
  finally:
    reader.close()

