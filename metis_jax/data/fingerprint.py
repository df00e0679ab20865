"""Content fingerprints of tokenizers and codecs, the lineage a model records, and the check that
a model, tokenizer and codec belong together.

A fingerprint is `sha256:` + 16 hex digits of a hash of what a part *is*, not of how its files
happen to be written:
  * a folder with a JSON config and `.npz` arrays (the k-means SSL tokenizer, the residual
    k-means acoustic tokenizer): the config re-serialized canonically without the fields that
    name where it was fitted (`VOLATILE_INFO`), then every array of every `.npz` (sorted by file
    and array name) as name, dtype, shape and bytes. The zip timestamps `np.savez` writes and
    the corpus path the fit records do not change it.
  * any other file (a codec's `.safetensors`, which are written deterministically): its bytes.
  * any other folder: the fingerprints of its files, by relative path.
A model's lineage is `lineage.json` in its training workdir:
  {"ssl_tokenizer": {"fingerprint": "sha256:...", "path": "..."},
   "acoustic_tokenizer": {...}}       # (S2A models; the codec or residual k-means)
`check_compatible` compares what each model records with the parts it is given.
"""

import hashlib
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

LINEAGE_NAME = "lineage.json"
# Keys of a tokenizer config's "info" that say where/when it was fitted, not what it is.
VOLATILE_INFO = ("corpus",)
_PREFIX = "sha256:"
_CACHE: dict = {}


class IncompatiblePartsError(ValueError):
  """Parts of a decode (models, tokenizer, codec) that were not trained together (one line)."""


def _canonical_json(path: str) -> bytes:
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  if isinstance(cfg, dict) and isinstance(cfg.get("info"), dict):
    cfg = dict(cfg, info={k: v for k, v in cfg["info"].items() if k not in VOLATILE_INFO})
  return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()


def _hash_npz(h, path: str) -> None:
  with np.load(path, allow_pickle=False) as z:
    for name in sorted(z.files):
      a = np.ascontiguousarray(z[name])
      h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
      h.update(a.tobytes())


def _hash_file(h, path: str) -> None:
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)


def _digest(h) -> str:
  return _PREFIX + h.hexdigest()[:16]


def file_fingerprint(path: str) -> str:
  """Fingerprint of one file: its bytes (`.npz`: its arrays; `.json`: its canonical content)."""
  path = os.path.abspath(path)
  st = os.stat(path)
  key = (path, st.st_size, st.st_mtime_ns)
  if key not in _CACHE:  # multi-GB safetensors are hashed once per process
    h = hashlib.sha256()
    if path.endswith(".npz"):
      _hash_npz(h, path)
    elif path.endswith(".json"):
      h.update(_canonical_json(path))
    else:
      _hash_file(h, path)
    _CACHE[key] = _digest(h)
  return _CACHE[key]


def folder_fingerprint(directory: str, skip: tuple = (LINEAGE_NAME, ".complete")) -> str:
  """Fingerprint of a folder: each file's `file_fingerprint` by sorted relative path.

  Hidden files and `skip` (bookkeeping, not content) are left out.
  """
  h = hashlib.sha256()
  found = False
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      if name.startswith(".") or name in skip:
        continue
      rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
      h.update(f"{rel}={file_fingerprint(os.path.join(root, name))}\n".encode())
      found = True
  if not found:
    raise FileNotFoundError(f"{directory}: no files to fingerprint")
  return _digest(h)


def fingerprint(path: str) -> str:
  """Fingerprint of a tokenizer folder, acoustic tokenizer folder, codec folder or codec file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: nothing to fingerprint (no such file or folder)")
  return folder_fingerprint(path) if os.path.isdir(path) else file_fingerprint(path)


def codec_fingerprint(encoder: str, decoder: Optional[str] = None) -> str:
  """Fingerprint of an acoustic codec given as a folder, or as its encoder and decoder files."""
  if decoder is None:
    return fingerprint(encoder)
  h = hashlib.sha256(f"encoder={file_fingerprint(encoder)}\ndecoder={file_fingerprint(decoder)}\n".encode())
  return _digest(h)


# ----------------------------------------------------------------------------- lineage


def lineage_entry(path: str, fp: Optional[str] = None) -> dict:
  """{"fingerprint", "path"} of a part (fingerprinted now unless `fp` is given)."""
  return {"fingerprint": fp or fingerprint(path), "path": os.path.abspath(path)}


def write_lineage(directory: str, lineage: Mapping[str, Mapping[str, Any]]) -> str:
  """Writes `<directory>/lineage.json` ({part name: lineage_entry}); returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, LINEAGE_NAME)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({k: dict(v) for k, v in sorted(lineage.items())}, f, indent=1)
  os.replace(tmp, path)
  return path


def read_lineage(directory: str) -> dict:
  """The `lineage.json` of a workdir or shard folder ({} when it has none)."""
  path = os.path.join(directory, LINEAGE_NAME)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def lineage_of_sources(sources) -> dict:
  """The lineage shared by training sources (shard folders with `lineage.json`).

  Sources without one contribute nothing; two sources made with different
  parts raise `IncompatiblePartsError`.
  """
  merged: dict = {}
  for src in sources:
    if "://" in str(src) or not os.path.isdir(src):
      continue
    for name, entry in read_lineage(src).items():
      if name in merged and merged[name]["fingerprint"] != entry["fingerprint"]:
        raise IncompatiblePartsError(
            f"error: training sources disagree on the {name}: {merged[name]['path']} "
            f"({merged[name]['fingerprint']}) vs {entry['path']} ({entry['fingerprint']}); "
            "tokenize every source with the same tokenizer")
      merged.setdefault(name, dict(entry))
  return merged


# ----------------------------------------------------------------------------- the check


def check_compatible(parts: Mapping[str, Mapping[str, Any]]) -> None:
  """Raises `IncompatiblePartsError` (one line) unless the parts belong together.

  Args:
    parts: {name: {"path": str, "fingerprint": str (tokenizers, codecs),
      "trained_on": {part name: fingerprint} (models)}}, e.g. names
      'stage1', 's2a_1layer', 's2a_full', 'ssl_tokenizer', 'acoustic_tokenizer'.
      A model whose `trained_on` is empty (released weights, an old
      workdir) is not checked.

  Each model's recorded fingerprint must equal that of the part of the same
  name when it is given, and two models must not record different
  fingerprints for the same part.
  """
  recorded: dict = {}  # part name -> (model name, fingerprint)
  for model, spec in parts.items():
    for name, want in sorted((spec.get("trained_on") or {}).items()):
      given = parts.get(name)
      if given is not None and given.get("fingerprint") and given["fingerprint"] != want:
        raise IncompatiblePartsError(
            f"error: the {name} {given.get('path', '')} ({given['fingerprint']}) does not belong to "
            f"the {model} {spec.get('path', '')}, which was trained on {name} {want}; give the {name} "
            "it was trained with (its lineage.json says which) or retrain")
      if name in recorded and recorded[name][1] != want:
        other = recorded[name][0]
        raise IncompatiblePartsError(
            f"error: the {model} {spec.get('path', '')} was trained on {name} {want} but the {other} "
            f"{parts[other].get('path', '')} on {recorded[name][1]}: they do not belong together")
      recorded.setdefault(name, (model, want))


def model_part(path: str) -> dict:
  """A model's entry for `check_compatible`: its path and what its `lineage.json` records."""
  lineage = read_lineage(path) if os.path.isdir(path) else {}
  return {"path": path, "trained_on": {k: v["fingerprint"] for k, v in lineage.items()}}


def data_part(path: str) -> dict:
  """A tokenizer's or codec's entry for `check_compatible`: its path and fingerprint."""
  return {"path": path, "fingerprint": fingerprint(path)}
