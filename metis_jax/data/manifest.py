"""Per-shard statistics and the corpus manifest (`manifest.json`).

Each finished shard `tokens-i-of-n.array_record` has a sidecar
`tokens-i-of-n.stats.json` (written before the shard is renamed into place):

  {"shard": file name, "unit": i, "utterances": int, "seconds": float,
   "seconds_per_language": {lang: float}, "tokens": int,
   "skipped": [{"file": ..., "reason": ...}]}

`merge` folds them into the manifest:

  {"format": "metis_jax.tokens/1", "complete": bool, "num_shards": n,
   "missing_shards": [...], "shards": [{"file", "utterances", "hours"}],
   "utterances": int, "hours": float, "hours_per_language": {lang: float},
   "tokens": int, "skipped_count": int, "skipped_by_reason": {category: int},
   "skipped": [{"file", "reason"}], plus whatever `extra` the job adds
   (tokenizer, frame rate, filters)}.
"""

import collections
import json
import os
from typing import Any, Optional, Sequence

from metis_jax.data import shards

MANIFEST_NAME = "manifest.json"
STATS_SUFFIX = ".stats.json"
UNKNOWN_LANGUAGE = "und"

# Categories of skip reasons, matched in order against the reason text.
SKIP_CATEGORIES = (
    "unsupported format", "cannot decode", "empty audio", "non-finite samples", "silent",
    "absurd duration", "duration", "dnsmos", "not valid UTF-8", "without its json",
    "json without audio", "unreadable tar", "duplicate id", "metadata", "text is not",
    "tokenizer",
)


def categorize(reason: str) -> str:
  """The category of a skip reason (for `skipped_by_reason`)."""
  for c in SKIP_CATEGORIES:
    if c in reason:
      return c
  return "other"


def stats_path(shard_path: str) -> str:
  """`x.array_record` -> `x.stats.json`."""
  return shard_path[:-len(shards.SHARD_SUFFIX)] + STATS_SUFFIX


def shard_stats(shard_file: str, unit: int, kept: Sequence[dict[str, Any]],
                skipped: Sequence[dict[str, str]]) -> dict[str, Any]:
  """Statistics of one shard.

  Args:
    shard_file: the shard's file name.
    unit: its work-unit index.
    kept: per kept utterance {'duration': s, 'language': str, 'tokens': int}.
    skipped: [{'file': ..., 'reason': ...}].
  """
  per_lang = collections.defaultdict(float)
  for k in kept:
    per_lang[k["language"] or UNKNOWN_LANGUAGE] += k["duration"]
  return {
      "shard": shard_file, "unit": unit, "utterances": len(kept),
      "seconds": float(sum(k["duration"] for k in kept)),
      "seconds_per_language": dict(sorted(per_lang.items())),
      "tokens": int(sum(k["tokens"] for k in kept)),
      "skipped": list(skipped),
  }


def merge(output_dir: str, shard_files: Sequence[str], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Folds the stats of the planned shards into a manifest dict.

  Args:
    output_dir: the job's output folder.
    shard_files: file names of every planned shard, in plan order.
    extra: fields to add (tokenizer description, filters, ...).
  """
  stats, missing = [], []
  for name in shard_files:
    path = os.path.join(output_dir, name)
    if os.path.exists(path) and os.path.exists(stats_path(path)):
      with open(stats_path(path), encoding="utf-8") as f:
        stats.append(json.load(f))
    else:
      missing.append(name)
  per_lang = collections.defaultdict(float)
  skipped, reasons = [], collections.Counter()
  for s in stats:
    for lang, sec in s["seconds_per_language"].items():
      per_lang[lang] += sec
    for sk in s["skipped"]:
      skipped.append(sk)
      reasons[categorize(sk["reason"])] += 1
  manifest = {
      "format": "metis_jax.tokens/1",
      "complete": not missing,
      "num_shards": len(shard_files),
      "missing_shards": missing,
      "shards": [{"file": s["shard"], "utterances": s["utterances"], "hours": s["seconds"] / 3600}
                 for s in stats],
      "utterances": int(sum(s["utterances"] for s in stats)),
      "hours": float(sum(s["seconds"] for s in stats) / 3600),
      "hours_per_language": {k: v / 3600 for k, v in sorted(per_lang.items())},
      "tokens": int(sum(s["tokens"] for s in stats)),
      "skipped_count": len(skipped),
      "skipped_by_reason": dict(sorted(reasons.items())),
      "skipped": skipped,
  }
  if extra:
    manifest.update(extra)
  return manifest


def write(output_dir: str, manifest: dict[str, Any]) -> str:
  """Writes `manifest.json` atomically; returns its path."""
  path = os.path.join(output_dir, MANIFEST_NAME)
  shards.write_text_atomic(path, json.dumps(manifest, indent=1, ensure_ascii=False))
  return path


def load(output_dir: str) -> dict[str, Any]:
  """Reads `manifest.json` of a tokenized corpus."""
  with open(os.path.join(output_dir, MANIFEST_NAME), encoding="utf-8") as f:
    return json.load(f)
