"""Audio decoding, mono down-mix, band-limited resampling and sanity checks.

Everything returns float32 numpy arrays of shape `[samples]` in [-1, 1] (the
scale soundfile decodes to). Rates used by Metis: 16 kHz for the SSL side
(w2v-BERT and the k-means tokenizer) and 24 kHz for the acoustic codec.
"""

import io
import math
import os
from typing import BinaryIO, Optional, Union

import numpy as np
import scipy.signal
import soundfile

SSL_SAMPLE_RATE = 16000
ACOUSTIC_SAMPLE_RATE = 24000

# Containers we decode (through libsndfile, which reads MPEG audio since 1.1).
SUPPORTED_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
# Audio containers we recognize but do not decode: counted as skipped
# ('unsupported format') rather than silently ignored.
UNSUPPORTED_EXTENSIONS = (".m4a", ".aac", ".wma", ".opus", ".amr", ".ape",
                          ".mp4", ".webm", ".mka", ".ac3", ".aif", ".aiff",
                          ".au", ".caf", ".spx", ".wv")


class AudioError(ValueError):
  """A file that cannot be used as audio; the message names file and problem."""


def is_supported(name: str) -> bool:
  """True for file names whose extension we decode."""
  return os.path.splitext(name)[1].lower() in SUPPORTED_EXTENSIONS


def is_unsupported_audio(name: str) -> bool:
  """True for names of audio containers we recognize but do not decode."""
  return os.path.splitext(name)[1].lower() in UNSUPPORTED_EXTENSIONS


def decode(source: Union[str, bytes, BinaryIO], name: Optional[str] = None) -> tuple[np.ndarray, int]:
  """Decodes a file (path, bytes or file object) to float32 `[samples, channels]`.

  Args:
    source: a path, the encoded bytes, or a binary file object.
    name: the name to use in error messages (defaults to the path).

  Returns:
    (samples float32 [samples, channels], sample_rate).

  Raises:
    AudioError: the data is not decodable audio (truncated, corrupt, wrong
      format); the message names the file.
  """
  name = name or (source if isinstance(source, str) else "<bytes>")
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(source)
  try:
    data, rate = soundfile.read(source, dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
    raise AudioError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from e
  if rate <= 0:
    raise AudioError(f"{name}: invalid sample rate {rate}")
  return data, int(rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
  """Down-mixes `[samples, channels]` (or `[samples]`) to `[samples]` by averaging."""
  if samples.ndim == 1:
    return samples.astype(np.float32, copy=False)
  return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
  """Band-limited polyphase resampling of `[samples]` (Kaiser-windowed FIR).

  Output length is ceil(len * rate_out / rate_in).
  """
  if rate_in == rate_out:
    return samples.astype(np.float32, copy=False)
  g = math.gcd(rate_in, rate_out)
  up, down = rate_out // g, rate_in // g
  out = scipy.signal.resample_poly(samples.astype(np.float64), up, down)
  return out.astype(np.float32)


def check_waveform(samples: np.ndarray, silence_threshold_db: float = -60.0) -> Optional[str]:
  """Returns why a mono waveform `[samples]` is unusable, or None if it is fine.

  Reasons: 'empty audio', 'non-finite samples', 'silent' (peak below the
  threshold in dBFS).
  """
  if samples.size == 0:
    return "empty audio (0 samples)"
  if not np.all(np.isfinite(samples)):
    bad = int(np.size(samples) - np.count_nonzero(np.isfinite(samples)))
    return f"non-finite samples ({bad} NaN/inf)"
  peak = float(np.max(np.abs(samples)))
  peak_db = 20.0 * math.log10(peak) if peak > 0 else -math.inf
  if peak_db < silence_threshold_db:
    return f"silent (peak {peak_db:.1f} dBFS < {silence_threshold_db:g} dBFS)"
  return None


def load(source: Union[str, bytes, BinaryIO], rates: tuple[int, ...] = (SSL_SAMPLE_RATE,),
         name: Optional[str] = None,
         silence_threshold_db: float = -60.0) -> tuple[dict[int, np.ndarray], float]:
  """Decodes, down-mixes, checks and resamples one file.

  Args:
    source: path, bytes or file object.
    rates: the output sample rates wanted.
    name: name for error messages.
    silence_threshold_db: see `check_waveform`.

  Returns:
    ({rate: float32 [samples_at_rate]}, duration in seconds).

  Raises:
    AudioError: undecodable, empty, non-finite or silent audio.
  """
  name = name or (source if isinstance(source, str) else "<bytes>")
  data, rate = decode(source, name)
  mono = to_mono(data)
  reason = check_waveform(mono, silence_threshold_db)
  if reason:
    raise AudioError(f"{name}: {reason}")
  return {r: resample(mono, rate, r) for r in rates}, mono.shape[0] / rate
