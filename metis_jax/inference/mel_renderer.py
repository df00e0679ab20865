"""The demo's waveform renderer: residual k-means log-mel tokens -> waveform, by Griffin-Lim.

The demo's acoustic tokens (`data.acoustic_kmeans`) quantize standardized
24 kHz log-mel frames (80 bins, 20 Hz - 12 kHz, Hann 960 centred on a 480
hop, FFT 1024). Rendering inverts each step, with no training:
  1. tokens `[B, T, Q]` -> the sum of the layers' centroids, de-standardized:
     log-mel `[B, T, 80]` (exactly the tokenizer's quantized features);
  2. mel power -> linear power `[B, T, 513]` by non-negative least squares
     against the same mel filterbank (multiplicative updates from a
     filter-area spread), magnitude its square root;
  3. magnitude -> waveform `[B, T * 480]` by fast Griffin-Lim (Perraudin et
     al. 2013, momentum 0.99) on the tokenizer's own STFT grid, phases
     started from a fixed PRNG key: the same tokens give the same samples.
Phase is not in the tokens, so the waveform matches the input's spectrum,
not its samples: SI-SNR against the input is low by construction; the mel
distance and the frame-energy contour are the honest measures.

`MelRenderer` has the acoustic codec's interface (`hop`, `encode`,
`decode`, `params = None`, `config.num_quantizers`), so the decode engine
renders through it where it would call the neural codec. Everything is
jnp and traceable (called inside the engine's jitted render).
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.data import acoustic_kmeans as ak
from metis_jax.data import tokenizer as tokenizer_lib

FREQ_BINS = ak.FFT_SIZE // 2 + 1


@dataclasses.dataclass(frozen=True)
class MelRendererConfig:
  """What the engine reads of a codec config, and the inversion's knobs."""
  num_quantizers: int
  codebook_size: int
  hop_size: int = ak.HOP
  sample_rate: int = ak.SAMPLE_RATE
  iterations: int = 48          # Griffin-Lim iterations
  momentum: float = 0.99        # fast Griffin-Lim; 0 is the classic algorithm
  nnls_iterations: int = 30     # multiplicative updates of the mel inversion
  seed: int = 0                 # PRNG key of the initial phases


@functools.lru_cache(maxsize=None)
def _filterbank() -> np.ndarray:
  """float32 [513, 80]: the acoustic tokenizer's mel filterbank."""
  return tokenizer_lib.mel_filterbank(ak.NUM_MEL_BINS, ak.FFT_SIZE, ak.SAMPLE_RATE, 20.0, ak.SAMPLE_RATE / 2)


def _window() -> np.ndarray:
  return np.hanning(ak.WINDOW + 1)[:-1].astype(np.float32)


def stft(wav: jax.Array, frames: int) -> jax.Array:
  """float32 `[B, frames * 480]` -> complex `[B, frames, 513]` on `acoustic_kmeans.log_mel`'s grid.

  Frame t is the Hann-windowed 960 samples centred on sample t * 480 + 240
  (the signal padded by 240 before and 720 after), zero-padded to 1024.
  """
  hop = ak.HOP
  pad = (ak.WINDOW - hop) // 2
  x = jnp.pad(wav, ((0, 0), (pad, pad + hop)))               # [B, (frames + 2) * hop]
  blocks = x.reshape(x.shape[0], frames + 2, hop)
  windows = jnp.concatenate([blocks[:, :frames], blocks[:, 1:frames + 1]], axis=-1)  # [B, frames, 960]
  return jnp.fft.rfft(windows * _window(), n=ak.FFT_SIZE, axis=-1)


def istft(spec: jax.Array) -> jax.Array:
  """complex `[B, frames, 513]` -> float32 `[B, frames * 480]`: the least-squares inverse of `stft`.

  Windows span two 480-sample blocks, so the overlap-add is a shifted sum of
  halves (no scatter: the same sums in the same order on every device).
  """
  hop = ak.HOP
  frames = spec.shape[1]
  w = _window()
  x = jnp.fft.irfft(spec, n=ak.FFT_SIZE, axis=-1)[..., :ak.WINDOW] * w   # [B, F, 960]
  zero = jnp.zeros_like(x[:, :1, :hop])
  first, second = x[..., :hop], x[..., hop:]
  blocks = jnp.concatenate([first, zero], axis=1) + jnp.concatenate([zero, second], axis=1)  # [B, F+1, hop]
  w2 = w * w
  norm = np.zeros((frames + 1, hop), np.float32)
  norm[:frames] += w2[:hop]
  norm[1:] += w2[hop:]
  y = (blocks / np.maximum(norm, 1e-6)).reshape(spec.shape[0], (frames + 1) * hop)
  pad = (ak.WINDOW - hop) // 2
  return y[:, pad:pad + frames * hop]


def mel_to_power(mel_power: jax.Array, iterations: int) -> jax.Array:
  """Mel power `[..., 80]` -> non-negative linear power `[..., 513]` with `power @ fbank ~= mel_power`.

  Multiplicative NNLS updates (Lee and Seung) from each mel band's energy
  spread evenly over its filter.
  """
  fb = jnp.asarray(_filterbank())                                          # [513, 80]
  area = jnp.maximum(fb.sum(0), 1e-8)
  power = mel_power @ (fb / area).T + 1e-10
  target = mel_power @ fb.T
  gram = fb @ fb.T                                                         # [513, 513]

  def update(_, p):
    return p * target / (p @ gram + 1e-12)

  return jax.lax.fori_loop(0, iterations, update, power)


def griffin_lim(magnitude: jax.Array, iterations: int, momentum: float, key: jax.Array) -> jax.Array:
  """Magnitudes `[B, F, 513]` -> float32 `[B, F * 480]` by fast Griffin-Lim (module docstring)."""
  frames = magnitude.shape[1]
  phase = jax.random.uniform(key, magnitude.shape, jnp.float32, -np.pi, np.pi)
  spec = magnitude * jnp.exp(1j * phase)
  unit = lambda c: c / jnp.maximum(jnp.abs(c), 1e-8)

  def step(_, carry):
    c, prev = carry
    t = stft(istft(c), frames)
    c = magnitude * unit(t + momentum * (t - prev))
    return c, t

  spec, _ = jax.lax.fori_loop(0, iterations, step, (spec, spec))
  return istft(spec)


class MelRenderer:
  """Acoustic-codec interface over a residual k-means acoustic tokenizer (module docstring).

  Args:
    tokenizer: the fitted `ResidualKMeansAcousticTokenizer` the tokens came from.
    iterations, momentum, nnls_iterations, seed: see `MelRendererConfig`.
  """
  params = None  # nothing to place on a mesh: the engine calls encode/decode as they are
  hop = ak.HOP
  sample_rate = ak.SAMPLE_RATE

  def __init__(self, tokenizer: ak.ResidualKMeansAcousticTokenizer, iterations: int = 48,
               momentum: float = 0.99, nnls_iterations: int = 30, seed: int = 0):
    self.tokenizer = tokenizer
    self.config = MelRendererConfig(tokenizer.num_quantizers, tokenizer.codebook_size, iterations=iterations,
                                    momentum=momentum, nnls_iterations=nnls_iterations, seed=seed)
    self._codebooks = jnp.asarray(tokenizer.codebooks)
    self._mean, self._std = jnp.asarray(tokenizer.mean), jnp.asarray(tokenizer.std)

  @classmethod
  def load(cls, directory: str, **options) -> "MelRenderer":
    """From a saved acoustic tokenizer folder (`acoustic_tokenizer.json` + `codebooks.npz`)."""
    return cls(ak.ResidualKMeansAcousticTokenizer.load(directory), **options)

  def encode(self, wav, lengths=None) -> jax.Array:
    """float32 `[B, samples]` at 24 kHz (lengths `[B]`) -> codes int32 `[B, samples // 480, Q]`."""
    wav = jnp.asarray(wav, jnp.float32)
    if wav.ndim == 1:
      wav = wav[None]
    if lengths is None:
      lengths = jnp.full((wav.shape[0],), wav.shape[1], jnp.int32)
    codes, _ = self.tokenizer.tokenize(wav, lengths)
    return codes

  def log_mel(self, codes) -> jax.Array:
    """int `[B, T, q]` (q <= Q layers, coarse first) -> the quantized log-mel `[B, T, 80]`."""
    codes = jnp.asarray(codes, jnp.int32)
    q = codes.shape[-1]
    feats = sum(jnp.take(self._codebooks[i], codes[..., i], axis=0) for i in range(q))
    return feats * self._std + self._mean

  def decode(self, codes, frame_lengths=None) -> jax.Array:
    """int `[B, T, q]` -> float32 `[B, T * 480]` at 24 kHz (zero past `frame_lengths` `[B]`)."""
    codes = jnp.asarray(codes, jnp.int32)
    if codes.ndim == 2:
      codes = codes[None]
    batch, frames = codes.shape[:2]
    power = mel_to_power(jnp.exp(self.log_mel(codes)), self.config.nnls_iterations)
    magnitude = jnp.sqrt(power)
    if frame_lengths is not None:
      valid = jnp.arange(frames)[None, :] < jnp.asarray(frame_lengths)[:, None]
      magnitude = jnp.where(valid[..., None], magnitude, 0.0)
    wav = griffin_lim(magnitude, self.config.iterations, self.config.momentum,
                      jax.random.key(self.config.seed))
    if frame_lengths is not None:
      samples = jnp.asarray(frame_lengths)[:, None] * self.hop
      wav = jnp.where(jnp.arange(frames * self.hop)[None, :] < samples, wav, 0.0)
    return wav.reshape(batch, frames * self.hop)


# ----------------------------------------------------------------------------- measures


def frame_energy_db(wav: np.ndarray, hop: int = ak.HOP) -> np.ndarray:
  """Per-frame energy in dB `[len // hop]` (mean square of each hop, floor -100 dB)."""
  wav = np.asarray(wav, np.float64)
  n = len(wav) // hop
  return 10 * np.log10(np.maximum(np.mean(wav[:n * hop].reshape(n, hop) ** 2, axis=1), 1e-10))


def energy_correlation(a: np.ndarray, b: np.ndarray, hop: int = ak.HOP) -> float:
  """Pearson correlation of two waveforms' frame-energy contours (dB), over the shorter one."""
  ea, eb = frame_energy_db(a, hop), frame_energy_db(b, hop)
  n = min(len(ea), len(eb))
  return float(np.corrcoef(ea[:n], eb[:n])[0, 1])
