"""Corpus layouts -> work units -> utterances (or reasons to skip them).

Layouts (`config.data.layout`):
  'dir'         any directory tree of wav/flac/mp3/ogg. Beside `a/b.wav` may lie
                `a/b.normalized.txt`, `a/b.txt`, `a/b.lab` or `a/b.original.txt`
                (transcript, first found wins) and `a/b.json` (metadata: any of
                text, speaker, language, duration, dnsmos). The speaker defaults
                to the parent folder's name.
  'libritts'    'dir' where the speaker is the first `_` field of the file name
                (`260_123440_000010_000004.wav`) and the language 'en'.
  'librilight'  'dir' of flac + json (`speaker/book/file.flac`); the speaker is
                the json's 'speaker' or the grandparent folder; language 'en'.
  'emilia'      WebDataset tar shards: `<key>.mp3` + `<key>.json` with id, text,
                duration, speaker, language, dnsmos (Emilia / Emilia-Large).
  'auto'        'emilia' if the input holds `.tar` files, else 'dir'.

The job splits a corpus into `WorkUnit`s (a run of files, or one tar), each of
which becomes one output shard; `read_unit` yields `Utterance`s and `Skipped`
entries (file + reason) so that nothing bad stops the job and nothing is lost
silently.
"""

import dataclasses
import json
import math
import os
import tarfile
from typing import Iterator, Optional, Sequence, Union

from metis_jax.data import audio

LAYOUTS = ("auto", "dir", "libritts", "librilight", "emilia")
TRANSCRIPT_SUFFIXES = (".normalized.txt", ".txt", ".lab", ".original.txt")
_LAYOUT_LANGUAGE = {"libritts": "en", "librilight": "en"}


@dataclasses.dataclass
class Utterance:
  """One utterance before decoding.

  Attributes:
    id: unique id within the corpus (relative path without extension, or the
      Emilia id).
    origin: where it came from, for messages (path, or `tar:member`).
    audio: a path to the audio file, or its encoded bytes (tar members).
    text: transcript ('' if none).
    speaker: speaker id ('' if unknown).
    language: language tag ('' if unknown).
    duration: duration from metadata in seconds, if the corpus gives one.
    dnsmos: DNSMOS score from metadata, if any.
  """
  id: str
  origin: str
  audio: Union[str, bytes]
  text: str = ""
  speaker: str = ""
  language: str = ""
  duration: Optional[float] = None
  dnsmos: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file (or tar member) that was left out, and why."""
  file: str
  reason: str


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  """A part of the input that becomes one output shard.

  Attributes:
    index: position in the plan (the shard number).
    kind: 'files' (a run of audio files) or 'tar' (one WebDataset shard).
    paths: the files (absolute), sorted.
    layout: the resolved layout.
    root: the corpus root (ids are relative to it).
  """
  index: int
  kind: str
  paths: tuple[str, ...]
  layout: str
  root: str


def detect_layout(root: str) -> str:
  """'emilia' if `root` (a tar file or a folder) holds .tar files, else 'dir'."""
  if os.path.isfile(root):
    return "emilia" if root.endswith(".tar") else "dir"
  for _, _, files in os.walk(root):
    if any(f.endswith(".tar") for f in files):
      return "emilia"
  return "dir"


def _walk_sorted(root: str) -> Iterator[str]:
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      yield os.path.join(dirpath, f)


def plan_units(root: str, layout: str = "auto", files_per_shard: int = 512) -> list[WorkUnit]:
  """Splits a corpus into work units, deterministically (sorted paths).

  Args:
    root: corpus folder (or a single tar / audio file).
    layout: one of LAYOUTS.
    files_per_shard: audio files per unit for directory layouts.

  Returns:
    The units, numbered 0..n-1. Audio files with recognized but unsupported
    extensions are included so that they are reported as skipped.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown corpus layout {layout!r}; expected one of {LAYOUTS}")
  if not os.path.exists(root):
    raise FileNotFoundError(f"corpus {root!r} does not exist")
  root = os.path.abspath(root)
  if layout == "auto":
    layout = detect_layout(root)
  paths = [root] if os.path.isfile(root) else list(_walk_sorted(root))
  base = os.path.dirname(root) if os.path.isfile(root) else root
  if layout == "emilia":
    tars = [p for p in paths if p.endswith(".tar")]
    return [WorkUnit(i, "tar", (p,), layout, base) for i, p in enumerate(tars)]
  files = [p for p in paths if audio.is_supported(p) or audio.is_unsupported_audio(p)]
  n = max(1, files_per_shard)
  return [WorkUnit(i, "files", tuple(files[s:s + n]), layout, base)
          for i, s in enumerate(range(0, len(files), n))]


def metadata_problem(utt: Utterance, min_duration: float, max_duration: float,
                     min_dnsmos: float) -> Optional[str]:
  """Why metadata alone rules an utterance out (before decoding), or None."""
  if utt.duration is not None:
    d = utt.duration
    if not math.isfinite(d) or d <= 0:
      return f"absurd duration {d!r} s in metadata"
    if not min_duration <= d <= max_duration:
      return f"duration {d:.2f} s outside [{min_duration:g}, {max_duration:g}] s (metadata)"
  if utt.dnsmos is not None and min_dnsmos > 0:
    if not math.isfinite(utt.dnsmos) or utt.dnsmos < min_dnsmos:
      return f"dnsmos {utt.dnsmos:.2f} < {min_dnsmos:g}"
  return None


def duration_problem(seconds: float, min_duration: float, max_duration: float) -> Optional[str]:
  """Why a decoded duration is out of range, or None."""
  if not min_duration <= seconds <= max_duration:
    return f"duration {seconds:.2f} s outside [{min_duration:g}, {max_duration:g}] s"
  return None


def _read_text(path: str) -> str:
  """Reads a transcript; raises ValueError naming the file if not UTF-8."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig").strip()
  except UnicodeDecodeError as e:
    raise ValueError(f"transcript {os.path.basename(path)} is not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _parse_meta(raw: bytes, name: str) -> dict:
  try:
    meta = json.loads(raw.decode("utf-8-sig"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"metadata {name} is not valid UTF-8 JSON ({e})") from e
  if not isinstance(meta, dict):
    raise ValueError(f"metadata {name} is not a JSON object")
  return meta


def _float_or_none(value) -> Optional[float]:
  if value is None or value == "":
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return float("nan")


def _strip_audio_ext(path: str) -> str:
  return os.path.splitext(path)[0]


def _file_utterance(path: str, unit: WorkUnit, default_language: str) -> Union[Utterance, Skipped]:
  """An utterance from a file in a directory layout, with its sidecars."""
  rel = os.path.relpath(path, unit.root)
  if audio.is_unsupported_audio(path):
    return Skipped(rel, f"unsupported format {os.path.splitext(path)[1].lower()}")
  stem = _strip_audio_ext(path)
  meta = {}
  try:
    if os.path.exists(stem + ".json"):
      with open(stem + ".json", "rb") as f:
        meta = _parse_meta(f.read(), os.path.basename(stem + ".json"))
    text = None
    for suffix in TRANSCRIPT_SUFFIXES:
      if os.path.exists(stem + suffix):
        text = _read_text(stem + suffix)
        break
  except (ValueError, OSError) as e:
    return Skipped(rel, str(e))
  if text is None:
    text = str(meta.get("text", ""))
  name = os.path.basename(stem)
  parts = os.path.normpath(rel).split(os.sep)
  if unit.layout == "libritts":
    speaker = name.split("_")[0]
  elif unit.layout == "librilight":
    speaker = str(meta.get("speaker", parts[-3] if len(parts) >= 3 else ""))
  else:
    speaker = str(meta.get("speaker", parts[-2] if len(parts) >= 2 else ""))
  language = str(meta.get("language") or default_language or _LAYOUT_LANGUAGE.get(unit.layout, ""))
  return Utterance(
      id=_strip_audio_ext(rel).replace(os.sep, "/"), origin=rel, audio=path, text=text,
      speaker=speaker, language=language,
      duration=_float_or_none(meta.get("duration")), dnsmos=_float_or_none(meta.get("dnsmos")))


def _split_key(member_name: str) -> tuple[str, str]:
  """WebDataset convention: key = path up to the first dot of the basename."""
  dirname, base = os.path.split(member_name)
  key, dot, ext = base.partition(".")
  return os.path.join(dirname, key), (dot + ext).lower()


def _emilia_group(tar_name: str, key: str, members: dict[str, bytes],
                  default_language: str) -> Union[Utterance, Skipped]:
  """One WebDataset sample (members sharing a key) -> an utterance."""
  origin = f"{tar_name}:{key}"
  audio_exts = [e for e in members if audio.is_supported("x" + e)]
  if not audio_exts:
    other = [e for e in members if audio.is_unsupported_audio("x" + e)]
    if other:
      return Skipped(origin + other[0], f"unsupported format {other[0]}")
    return Skipped(origin + ".json", "json without audio member")
  ext = audio_exts[0]
  if ".json" not in members:
    return Skipped(origin + ext, "audio member without its json")
  try:
    meta = _parse_meta(members[".json"], key + ".json")
  except ValueError as e:
    return Skipped(origin + ".json", str(e))
  text = meta.get("text", "")
  if not isinstance(text, str):
    return Skipped(origin + ".json", f"text is not a string ({type(text).__name__})")
  return Utterance(
      id=str(meta.get("id") or os.path.basename(key)), origin=origin + ext, audio=members[ext],
      text=text.strip(), speaker=str(meta.get("speaker", "")),
      language=str(meta.get("language") or default_language),
      duration=_float_or_none(meta.get("duration")), dnsmos=_float_or_none(meta.get("dnsmos")))


def _read_tar(path: str, unit: WorkUnit, default_language: str) -> Iterator[Union[Utterance, Skipped]]:
  """Streams a WebDataset tar; a truncated tar keeps what was read before."""
  tar_name = os.path.relpath(path, unit.root)
  key, members = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:
      for info in tar:
        if not info.isfile():
          continue
        k, ext = _split_key(info.name)
        if k != key:
          if key is not None:
            yield _emilia_group(tar_name, key, members, default_language)
          key, members = k, {}
        f = tar.extractfile(info)
        members[ext] = f.read() if f is not None else b""
  except (tarfile.TarError, OSError, EOFError) as e:
    yield Skipped(tar_name, f"unreadable tar after {key or 'the start'} ({type(e).__name__}: {e})")
    key = None  # The last group may be incomplete: do not emit it.
  if key is not None:
    yield _emilia_group(tar_name, key, members, default_language)


def read_unit(unit: WorkUnit, min_duration: float = 0.0, max_duration: float = math.inf,
              min_dnsmos: float = 0.0, default_language: str = "") -> Iterator[Union[Utterance, Skipped]]:
  """Yields the utterances of a work unit, or `Skipped` for what is left out.

  Metadata filters (duration, DNSMOS) are applied here; checks that need the
  audio (decodability, silence, real duration) happen when decoding.
  """
  if unit.kind == "tar":
    items = _read_tar(unit.paths[0], unit, default_language)
  else:
    items = (_file_utterance(p, unit, default_language) for p in unit.paths)
  for item in items:
    if isinstance(item, Utterance):
      problem = metadata_problem(item, min_duration, max_duration, min_dnsmos)
      if problem:
        item = Skipped(item.origin, problem)
    yield item


def iter_corpus(root: str, layout: str = "auto", **filters) -> Iterator[Union[Utterance, Skipped]]:
  """All utterances of a corpus in plan order (for fitting and small jobs)."""
  for unit in plan_units(root, layout):
    yield from read_unit(unit, **filters)


def unit_fingerprint(units: Sequence[WorkUnit]) -> list[str]:
  """A compact description of a plan, to detect a changed input on resume."""
  return [f"{u.kind}:{len(u.paths)}:{os.path.relpath(u.paths[0], u.root) if u.paths else ''}" for u in units]
