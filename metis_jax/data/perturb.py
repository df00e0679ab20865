"""Timbre perturbation for voice-conversion training data (pure numpy/scipy).

VC fine-tuning needs a source utterance that says the same thing as the
target in another voice. We make one from the target itself by moving the two
things that carry most of a voice's identity, the pitch (f0) and the formants
(spectral envelope), while keeping timing and content:

  1. Pitch and formants together by a factor r = 2^(semitones / 12): a
     phase-vocoder time stretch to n r samples (STFT, Hann window 1024, hop
     256; magnitudes interpolated between frames, phases advanced by each
     bin's measured instantaneous frequency), then band-limited resampling
     back to n samples (`scipy.signal.resample_poly`). Played at the original
     rate every frequency is multiplied by r; the length is unchanged.
  2. Formant correction/warp by beta = formant_factor / r: per STFT frame the
     spectral envelope E(f) is the cepstrally smoothed log magnitude (the
     first 30 cepstral coefficients, below the pitch period of voices up to
     ~500 Hz), and the magnitude becomes |S(f)| E(f / beta) / E(f), phases
     kept. The harmonics (pitch) stay where step 1 put them; the envelope ends
     up scaled by `formant_factor` relative to the original.

`perturb_timbre(wav, rng)` draws semitones uniformly from +-[min, max]
(never near 0) and the formant factor from [1/f, f], so every source differs
from its target. Output length == input length, float32, peak <= the input's.
"""

import fractions
import math

import numpy as np
import scipy.signal

N_FFT = 1024
HOP = 256
LIFTER = 30


def _window(n_fft: int) -> np.ndarray:
  return np.hanning(n_fft + 1)[:-1]  # Periodic Hann: exact overlap-add at hop n_fft / 4.


def stft(x: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
  """`[n]` -> complex `[frames, n_fft // 2 + 1]` (centered frames, reflect padding)."""
  x = np.pad(np.asarray(x, np.float64), (n_fft // 2, n_fft // 2 + hop), mode="reflect" if len(x) > n_fft else "constant")
  frames = 1 + (len(x) - n_fft) // hop
  idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None]
  return np.fft.rfft(x[idx] * _window(n_fft), axis=-1)


def istft(spec: np.ndarray, length: int, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
  """Inverse of `stft` by weighted overlap-add; `[length]` float64."""
  frames = np.fft.irfft(spec, n_fft, axis=-1) * _window(n_fft)
  total = n_fft + hop * (len(spec) - 1)
  out = np.zeros((total,), np.float64)
  norm = np.zeros((total,), np.float64)
  w2 = _window(n_fft) ** 2
  for i, f in enumerate(frames):
    out[i * hop:i * hop + n_fft] += f
    norm[i * hop:i * hop + n_fft] += w2
  out = out / np.maximum(norm, 1e-8)
  out = out[n_fft // 2:n_fft // 2 + length]
  return np.pad(out, (0, max(0, length - len(out))))


def time_stretch(x: np.ndarray, length: int, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
  """Phase-vocoder stretch of `[n]` to `[length]` samples, pitch unchanged."""
  spec = stft(x, n_fft, hop)
  rate = len(x) / max(length, 1)
  steps = np.arange(0, len(spec) - 1, rate)
  omega = 2 * np.pi * hop * np.arange(spec.shape[1]) / n_fft  # Expected phase advance per hop.
  k = steps.astype(np.int64)
  frac = (steps - k)[:, None]
  a, b = spec[k], spec[np.minimum(k + 1, len(spec) - 1)]
  mag = (1 - frac) * np.abs(a) + frac * np.abs(b)
  dphi = np.angle(b) - np.angle(a) - omega
  dphi -= 2 * np.pi * np.round(dphi / (2 * np.pi))
  # Phase of output frame i: the first frame's phase plus the advances of frames 0..i-1.
  advance = np.concatenate([np.zeros((1, spec.shape[1])), np.cumsum(omega + dphi, axis=0)[:-1]])
  out = mag * np.exp(1j * (np.angle(spec[0]) + advance))
  return istft(out, length, n_fft, hop)


def resample_to(x: np.ndarray, length: int) -> np.ndarray:
  """Band-limited resampling of `[n]` to exactly `[length]` samples."""
  ratio = fractions.Fraction(length, max(len(x), 1)).limit_denominator(200)
  y = scipy.signal.resample_poly(np.asarray(x, np.float64), ratio.numerator, ratio.denominator)
  return np.pad(y[:length], (0, max(0, length - len(y))))


def pitch_shift(x: np.ndarray, semitones: float) -> np.ndarray:
  """Every frequency (pitch and formants) of `[n]` times 2^(semitones/12); `[n]` float64."""
  n = len(x)
  r = 2.0 ** (semitones / 12.0)
  return resample_to(time_stretch(x, int(round(n * r))), n)


def spectral_envelope(mag: np.ndarray, lifter: int = LIFTER) -> np.ndarray:
  """Cepstrally smoothed envelope of magnitudes `[frames, bins]` (same shape, > 0)."""
  n_fft = 2 * (mag.shape[-1] - 1)
  ceps = np.fft.irfft(np.log(np.maximum(mag, 1e-8)), n_fft, axis=-1)
  ceps[:, lifter:n_fft - lifter + 1] = 0.0
  return np.exp(np.fft.rfft(ceps, axis=-1).real)


def warp_formants(x: np.ndarray, beta: float, n_fft: int = N_FFT, hop: int = HOP) -> np.ndarray:
  """Scales the spectral envelope of `[n]` along frequency by `beta`, harmonics kept; `[n]`."""
  spec = stft(x, n_fft, hop)
  mag = np.abs(spec)
  env = spectral_envelope(mag)
  bins = np.arange(mag.shape[1], dtype=np.float64)
  src = bins / beta  # E'(f) = E(f / beta).
  lo = np.minimum(np.floor(src).astype(np.int64), len(bins) - 1)
  hi = np.minimum(lo + 1, len(bins) - 1)
  w = np.clip(src - lo, 0.0, 1.0)
  warped = (1 - w) * env[:, lo] + w * env[:, hi]
  return istft(spec * (warped / env), len(x), n_fft, hop)


def perturb_timbre(wav: np.ndarray, rng: np.random.Generator, semitones: tuple[float, float] = (2.0, 5.0),
                   formant_factor: float = 1.15) -> tuple[np.ndarray, dict]:
  """A timbre-perturbed copy of `wav [n]` (see the module doc); returns (`[n]` float32, the draws).

  Args:
    wav: float32 [n] at any rate (16 kHz here).
    rng: the example's generator.
    semitones: (min, max) magnitude of the pitch shift; the sign is random.
    formant_factor: the envelope is scaled by a factor drawn log-uniformly from
      [1/formant_factor, formant_factor].
  """
  wav = np.asarray(wav, np.float32)
  lo, hi = semitones
  shift = float(rng.uniform(lo, hi)) * (1.0 if rng.random() < 0.5 else -1.0)
  alpha = math.exp(float(rng.uniform(-math.log(formant_factor), math.log(formant_factor))))
  y = pitch_shift(wav, shift)
  y = warp_formants(y, alpha / 2.0 ** (shift / 12.0))
  peak_in, peak_out = float(np.max(np.abs(wav))), float(np.max(np.abs(y)))
  if peak_out > peak_in > 0:
    y = y * (peak_in / peak_out)
  return y.astype(np.float32), {"semitones": shift, "formant_factor": alpha}
