"""Differentiable spectral transforms and the DAC-style multi-scale mel distance.

- `stft_magnitude`: centered (reflect-padded) STFT magnitude, periodic Hann.
- `mel_filterbank`: Slaney-style mel filters (librosa's default), numpy.
- `multiscale_mel_loss`: DAC's multi-scale log-mel L1: for each window w
  (32..2048, hop w/4, 5..320 mels) mean |log10 max(mel(x), 1e-5) -
  log10 max(mel(y), 1e-5)|, summed over the scales.
- `mel_distance`: that loss over the scales' count, numpy in, float out (codec reports).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_BINS = (5, 10, 20, 40, 80, 160, 320)


def _hz_to_mel(f):
  f = np.asarray(f, np.float64)
  f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
  return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, np.log(6.4) / 27.0
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """`[n_fft // 2 + 1, n_mels]` Slaney-normalized triangular filters (float32)."""
  fmax = sample_rate / 2 if fmax is None else fmax
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
  return weights.T.astype(np.float32)


def stft_magnitude(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """`[batch, samples]` -> `[batch, 1 + samples // hop, n_fft // 2 + 1]` |STFT| (centered, reflect)."""
  pad = n_fft // 2
  if x.shape[-1] <= pad:
    raise ValueError(f"{x.shape[-1]} samples are too few for a centered STFT of {n_fft}")
  xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (pad, pad)], mode="reflect")
  n_frames = 1 + x.shape[-1] // hop
  idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  frames = xp[:, idx] * window.astype(np.float32)
  return jnp.abs(jnp.fft.rfft(frames, axis=-1))


def log_mel(x: jax.Array, sample_rate: int, n_fft: int, n_mels: int, eps: float = 1e-5) -> jax.Array:
  """log10 mel spectrogram `[batch, frames, n_mels]` of `[batch, samples]`, hop n_fft / 4."""
  mag = stft_magnitude(x, n_fft, n_fft // 4)
  mel = jnp.einsum("btf,fm->btm", mag, jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels)),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log10(jnp.maximum(mel, eps))


def multiscale_mel_loss(x: jax.Array, y: jax.Array, sample_rate: int = 24000,
                        windows=MEL_WINDOWS, bins=MEL_BINS) -> jax.Array:
  """Sum over scales of the mean |log-mel(x) - log-mel(y)|; x, y `[batch, samples]`."""
  loss = 0.0
  for n_fft, n_mels in zip(windows, bins):
    loss = loss + jnp.mean(jnp.abs(log_mel(x, sample_rate, n_fft, n_mels) - log_mel(y, sample_rate, n_fft, n_mels)))
  return loss


def mel_distance(estimate: np.ndarray, reference: np.ndarray, sample_rate: int = 24000) -> float:
  """Mean over the 7 scales of the log10-mel L1 distance (the training mel loss / 7)."""
  x = jnp.asarray(np.asarray(estimate, np.float32)[None])
  y = jnp.asarray(np.asarray(reference, np.float32)[None])
  return float(multiscale_mel_loss(x, y, sample_rate)) / len(MEL_WINDOWS)
