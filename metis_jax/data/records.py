"""The byte format of one tokenized utterance (one ArrayRecord record).

A record is a msgpack map (format version 1) with short keys:

  key   type                      meaning
  'v'   int                       format version (1)
  'id'  str                       utterance id, unique within the corpus
  's'   bytes                     SSL tokens, int16 little-endian, [T] (50 Hz)
  'a'   bytes (optional)          acoustic tokens, int16 LE, row-major [Ta, q]
  'q'   int (optional)            q, the number of acoustic codebooks (12)
  'p'   bytes (optional)          phone ids, int16 LE, [P]
  't'   str                       transcript ('' if none)
  'spk' str                       speaker id ('' if unknown)
  'lng' str                       language tag ('' if unknown)
  'dur' float                     duration of the audio in seconds
  'src' str (optional)            the source audio file, relative to the corpus
                                  root (`tokenize --record_sources`); the
                                  task pipelines (`tasks`) read audio from it

Tokens are stored as int16 (vocabularies up to 32767), so a 10 s utterance
costs about 1 kB of SSL tokens plus its text: records stay small, which keeps
random access and multiprocess prefetch cheap. msgpack ships with flax.
"""

from typing import Any, Optional

import msgpack
import numpy as np

FORMAT_VERSION = 1
_INT16_MAX = np.iinfo(np.int16).max


def _pack_tokens(tokens: np.ndarray, what: str, rid: str) -> bytes:
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() > _INT16_MAX):
    raise ValueError(f"record {rid!r}: {what} out of int16 range [{tokens.min()}, {tokens.max()}]")
  return tokens.astype("<i2").tobytes()


def encode(rid: str, ssl_tokens: np.ndarray, *, text: str = "", speaker: str = "", language: str = "",
           duration: float = 0.0, acoustic_tokens: Optional[np.ndarray] = None,
           phones: Optional[np.ndarray] = None, source: Optional[str] = None) -> bytes:
  """Serializes one utterance.

  Args:
    rid: utterance id.
    ssl_tokens: int [T] SSL token ids.
    text: transcript.
    speaker: speaker id.
    language: language tag.
    duration: seconds of audio.
    acoustic_tokens: optional int [Ta, q] acoustic codec tokens.
    phones: optional int [P] phone ids.
    source: optional path of the source audio file relative to the corpus root.

  Returns:
    The record bytes.
  """
  ssl_tokens = np.asarray(ssl_tokens)
  if ssl_tokens.ndim != 1:
    raise ValueError(f"record {rid!r}: ssl tokens must be [T], got shape {ssl_tokens.shape}")
  rec: dict[str, Any] = {"v": FORMAT_VERSION, "id": rid, "s": _pack_tokens(ssl_tokens, "ssl tokens", rid),
                         "t": text, "spk": speaker, "lng": language, "dur": float(duration)}
  if acoustic_tokens is not None:
    acoustic_tokens = np.asarray(acoustic_tokens)
    if acoustic_tokens.ndim != 2:
      raise ValueError(f"record {rid!r}: acoustic tokens must be [T, q], got {acoustic_tokens.shape}")
    rec["a"] = _pack_tokens(acoustic_tokens, "acoustic tokens", rid)
    rec["q"] = int(acoustic_tokens.shape[1])
  if phones is not None:
    rec["p"] = _pack_tokens(np.asarray(phones).reshape(-1), "phones", rid)
  if source is not None:
    rec["src"] = str(source)
  return msgpack.packb(rec, use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
  """Parses a record into a dict of numpy arrays and strings.

  Returns:
    {'id': str, 'ssl_tokens': int16 [T], 'text': str, 'speaker': str,
     'language': str, 'duration': float} plus 'acoustic_tokens' int16 [Ta, q]
    and 'phones' int16 [P] and 'source' str when present.
  """
  rec = msgpack.unpackb(data, raw=False)
  version = rec.get("v")
  if version != FORMAT_VERSION:
    raise ValueError(f"record format version {version!r} is not {FORMAT_VERSION}")
  out = {"id": rec["id"], "ssl_tokens": np.frombuffer(rec["s"], "<i2"), "text": rec["t"],
         "speaker": rec["spk"], "language": rec["lng"], "duration": rec["dur"]}
  if "a" in rec:
    out["acoustic_tokens"] = np.frombuffer(rec["a"], "<i2").reshape(-1, rec["q"])
  if "p" in rec:
    out["phones"] = np.frombuffer(rec["p"], "<i2")
  if "src" in rec:
    out["source"] = rec["src"]
  return out


def ssl_tokens_only(data: bytes) -> np.ndarray:
  """The SSL tokens of a record, int32 [T] (the fast path of the pipeline)."""
  rec = msgpack.unpackb(data, raw=False)
  return np.frombuffer(rec["s"], "<i2").astype(np.int32)
