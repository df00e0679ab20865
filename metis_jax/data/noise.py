"""Noise and room-response sources for the task pipelines, and the mixing maths.

User data: any tree of audio files (wav/flac/mp3/ogg, walked recursively in
sorted order), e.g. DNS-Challenge `noise_fullband/` and `impulse_responses/`,
MUSAN `noise/` and `music/`, WHAM! `tr/`. `NoiseBank(noise_dirs, rir_dirs)`
lists the files once; clips are decoded on demand (mono, resampled to 16 kHz)
and a few are kept in a small per-process cache.

Mixing (all float32 `[samples]` at 16 kHz):
  mix_at_snr(clean, noise, snr_db)  scales `noise` so that
      10 log10(sum clean^2 / sum (g noise)^2) = snr_db and returns
      (clean + g noise, g noise). SIR mixing of an interfering talker is the
      same function.
  reverberate(x, rir)  convolves with a room response normalized to its
      direct path (peak 1), cut to len(x); the direct-path delay is removed so
      the reverberant speech stays aligned with its tokens.

Synthetic sources (the demo corpus, tests; no downloads): coloured noise with
a 1/f^beta spectrum (white 0, pink 1, brown 2), mains hum (50 or 60 Hz and
harmonics), babble (a sum of other utterances) and room responses
`rir = exp(-6.91 t / rt60) * gaussian noise` with a unit direct path (an
exponentially decaying diffuse tail: 60 dB down after rt60 seconds).
`make_demo_noise` writes them as 16 kHz wav files; see `make_demo_noise.py`.
"""

import collections
import math
import os
from typing import Optional, Sequence

import numpy as np
import soundfile

from metis_jax.data import audio

SAMPLE_RATE = audio.SSL_SAMPLE_RATE
_EPS = 1e-12


def energy(x: np.ndarray) -> float:
  """Sum of squares of `[samples]` (float64)."""
  x = np.asarray(x, np.float64)
  return float(np.dot(x, x))


def snr_db(signal: np.ndarray, noise: np.ndarray) -> float:
  """10 log10(energy(signal) / energy(noise))."""
  return 10.0 * math.log10(max(energy(signal), _EPS) / max(energy(noise), _EPS))


def fit_length(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """`[m]` -> `[n]`: a random window of a longer clip, or a shorter one tiled from a random phase."""
  x = np.asarray(x, np.float32)
  if len(x) == 0:
    return np.zeros((n,), np.float32)
  if len(x) >= n:
    start = int(rng.integers(0, len(x) - n + 1))
    return x[start:start + n].copy()
  reps = -(-(n + len(x)) // len(x))
  start = int(rng.integers(0, len(x)))
  return np.tile(x, reps)[start:start + n].copy()


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr: float) -> tuple[np.ndarray, np.ndarray]:
  """clean `[n]` + noise `[n]` scaled to `snr` dB; returns (mixture `[n]`, scaled noise `[n]`).

  A silent noise clip leaves the clean signal unchanged (and the returned noise is zeros).
  """
  clean = np.asarray(clean, np.float32)
  noise = np.asarray(noise, np.float32)
  if noise.shape != clean.shape:
    raise ValueError(f"mix_at_snr: clean {clean.shape} and noise {noise.shape} differ")
  e_noise = energy(noise)
  if e_noise <= _EPS:
    return clean.copy(), np.zeros_like(clean)
  gain = math.sqrt(energy(clean) / (e_noise * 10.0 ** (snr / 10.0)))
  scaled = (noise * gain).astype(np.float32)
  return clean + scaled, scaled


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
  """`x [n]` convolved with `rir [m]` (peak-normalized, direct path moved to t = 0); `[n]`."""
  rir = np.asarray(rir, np.float64)
  if rir.size == 0 or not np.any(rir):
    return np.asarray(x, np.float32).copy()
  peak = int(np.argmax(np.abs(rir)))
  rir = rir[peak:] / abs(rir[peak])
  import scipy.signal  # pylint: disable=g-import-not-at-top
  y = scipy.signal.fftconvolve(np.asarray(x, np.float64), rir)[:len(x)]
  return y.astype(np.float32)


def peak_normalize(parts: Sequence[np.ndarray], limit: float = 0.99) -> list[np.ndarray]:
  """Scales all arrays by one gain so the largest |sample| of the first is <= limit (ratios kept)."""
  peak = float(np.max(np.abs(parts[0]))) if parts[0].size else 0.0
  if peak <= limit:
    return list(parts)
  g = limit / peak
  return [(p * g).astype(np.float32) for p in parts]


# ---------------------------------------------------------------------------
# Sources.


def list_audio(roots: Sequence[str], what: str) -> list[str]:
  """Audio files under `roots` (folders walked in sorted order, or files); one `error:` per bad root."""
  files = []
  for root in roots:
    if os.path.isfile(root):
      files.append(root)
      continue
    if not os.path.isdir(root):
      raise FileNotFoundError(f"error: {what} directory {root!r} does not exist; pass a folder of wav/flac files")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if audio.is_supported(f))
    if not found:
      raise FileNotFoundError(f"error: {what} directory {root!r} holds no audio files "
                              f"({', '.join(audio.SUPPORTED_EXTENSIONS)})")
    files.extend(found)
  return files


class NoiseBank:
  """Noise clips and room responses from user folders, decoded lazily at 16 kHz.

  Picklable (Grain worker processes get a copy; each keeps its own cache).
  A clip that cannot be decoded raises `audio.AudioError` from `noise`/`rir`
  (the task transform turns it into a skipped example).
  """

  def __init__(self, noise_dirs: Sequence[str] = (), rir_dirs: Sequence[str] = (), cache_size: int = 64):
    self.noise_files = list_audio(noise_dirs, "noise") if noise_dirs else []
    self.rir_files = list_audio(rir_dirs, "room response") if rir_dirs else []
    self.cache_size = cache_size
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = collections.OrderedDict()
    return state

  def _load(self, path: str) -> np.ndarray:
    if path in self._cache:
      self._cache.move_to_end(path)
      return self._cache[path]
    # Noise may be far quieter than speech: no silence check (mix_at_snr scales it; an all-zero clip adds nothing).
    waves, _ = audio.load(path, (SAMPLE_RATE,), silence_threshold_db=-math.inf)
    wav = waves[SAMPLE_RATE]
    self._cache[path] = wav
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    return wav

  def noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
    """A random noise clip fitted to `n` samples (`fit_length`)."""
    if not self.noise_files:
      raise ValueError("error: no noise files: set the task's noise_dirs (a DNS/MUSAN/WHAM!-style folder)")
    path = self.noise_files[int(rng.integers(len(self.noise_files)))]
    return fit_length(self._load(path), n, rng)

  def rir(self, rng: np.random.Generator) -> Optional[np.ndarray]:
    """A random room response `[m]`, or None when there are none."""
    if not self.rir_files:
      return None
    return self._load(self.rir_files[int(rng.integers(len(self.rir_files)))])


# ---------------------------------------------------------------------------
# Synthetic sources.


def coloured_noise(n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
  """Gaussian noise `[n]` with power spectrum ~ 1/f^beta, unit RMS."""
  spec = np.fft.rfft(rng.standard_normal(n))
  f = np.fft.rfftfreq(n)
  f[0] = f[1] if n > 1 else 1.0
  spec *= f ** (-beta / 2.0)
  x = np.fft.irfft(spec, n)
  return (x / (np.sqrt(np.mean(x ** 2)) + _EPS)).astype(np.float32)


def hum(n: int, mains_hz: float, rng: np.random.Generator, harmonics: int = 6) -> np.ndarray:
  """Mains hum `[n]`: `mains_hz` and its harmonics with random phases and 1/k amplitudes, unit RMS."""
  t = np.arange(n) / SAMPLE_RATE
  x = sum(np.sin(2 * np.pi * mains_hz * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, harmonics + 1))
  x = x + 0.05 * rng.standard_normal(n)
  return (x / (np.sqrt(np.mean(x ** 2)) + _EPS)).astype(np.float32)


def babble(utterances: Sequence[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
  """The sum of several utterances (each unit RMS, tiled to `n` from a random phase), unit RMS."""
  x = np.zeros((n,), np.float64)
  for u in utterances:
    u = fit_length(u, n, rng).astype(np.float64)
    x += u / (np.sqrt(np.mean(u ** 2)) + _EPS)
  return (x / (np.sqrt(np.mean(x ** 2)) + _EPS)).astype(np.float32)


def synthetic_rir(rt60: float, rng: np.random.Generator, seconds: Optional[float] = None) -> np.ndarray:
  """A room response `[m]`: unit direct path, then a Gaussian tail decaying 60 dB in `rt60` s."""
  m = int(SAMPLE_RATE * (seconds or min(1.0, 1.2 * rt60)))
  t = np.arange(m) / SAMPLE_RATE
  tail = rng.standard_normal(m) * np.exp(-6.91 * t / rt60) * 0.3
  tail[:int(0.002 * SAMPLE_RATE)] = 0.0  # First reflections arrive after ~2 ms.
  tail[0] = 1.0
  return tail.astype(np.float32)


def make_demo_noise(output_dir: str, corpus_dir: str = "", seed: int = 0, seconds: float = 8.0,
                    babble_talkers: int = 4, babble_clips: int = 3) -> dict:
  """Writes synthetic noise and room responses under `output_dir/{noise,rir}/` (16 kHz wav).

  noise/: white, pink and brown noise, 50 and 60 Hz hum, and (with
  `corpus_dir`, the demo corpus) `babble_clips` babble clips of
  `babble_talkers` utterances each; rir/: decays with rt60 0.2-0.8 s.

  Returns:
    {'noise': [paths], 'rir': [paths]}.
  """
  rng = np.random.default_rng(seed)
  n = int(seconds * SAMPLE_RATE)
  noise_dir, rir_dir = os.path.join(output_dir, "noise"), os.path.join(output_dir, "rir")
  os.makedirs(noise_dir, exist_ok=True)
  os.makedirs(rir_dir, exist_ok=True)
  clips = {f"{name}.wav": coloured_noise(n, beta, rng) for name, beta in (("white", 0.0), ("pink", 1.0),
                                                                         ("brown", 2.0))}
  clips["hum50.wav"] = hum(n, 50.0, rng)
  clips["hum60.wav"] = hum(n, 60.0, rng)
  if corpus_dir:
    speech = list_audio([corpus_dir], "demo corpus")
    for i in range(babble_clips):
      pick = rng.choice(len(speech), size=min(babble_talkers, len(speech)), replace=False)
      utts = [audio.load(speech[j], (SAMPLE_RATE,))[0][SAMPLE_RATE] for j in sorted(pick)]
      clips[f"babble{i}.wav"] = babble(utts, n, rng)
  out = {"noise": [], "rir": []}
  for name, x in clips.items():
    path = os.path.join(noise_dir, name)
    soundfile.write(path, 0.25 * x, SAMPLE_RATE, subtype="FLOAT")
    out["noise"].append(path)
  for rt60 in (0.2, 0.35, 0.5, 0.8):
    path = os.path.join(rir_dir, f"rir_rt{int(rt60 * 1000):03d}ms.wav")
    soundfile.write(path, synthetic_rir(rt60, rng), SAMPLE_RATE, subtype="FLOAT")
    out["rir"].append(path)
  return out
