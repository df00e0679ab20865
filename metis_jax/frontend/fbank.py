"""SeamlessM4T / w2v-BERT 2.0 filterbank front-end in JAX (jit-able, batched).

Reproduces Hugging Face `SeamlessM4TFeatureExtractor` (the processor of
`facebook/w2v-bert-2.0`) with its default arguments:

  1. waveform (16 kHz, float in [-1, 1]) x 2^15 (Kaldi's 16-bit scale);
  2. frames of 400 samples every 160 (no centering):
     F = floor((N - 400) / 160) + 1 frames for N samples (0 if N < 400);
  3. per frame: DC removal, pre-emphasis 0.97 (y[0] = 0.03 x[0]), symmetric
     Povey window (hann(400)^0.85), zero-padded 512-point FFT, power;
  4. 80 Kaldi-mel triangles (20 Hz - 8 kHz, triangular in mel space, no
     normalization), floor 1.1920929e-7, natural log;
  5. per utterance and mel bin: (x - mean) / sqrt(var(ddof=1) + 1e-7) over
     the utterance's own frames;
  6. zero frames appended up to an even count, pairs of frames stacked:
     `[batch, ceil(F / 2), 160]` at 50 Hz.

Hugging Face's attention mask keeps the *odd* frame of each pair, so when F is
odd the last token (whose second half is padding) is emitted but marked as
padding for the encoder's attention and convolutions: `lengths` here counts
emitted tokens (ceil(F / 2): 49 for 1 s, 499 for 10 s) and `mask` is exactly
Hugging Face's `attention_mask` (the first floor(F / 2) tokens).

Two implementations of the same thing:
  * `extract` (JAX, float32, jit-able, runs on the accelerator): the spectrum
    is computed in float32, which has a dynamic range of about 1e7 in
    amplitude. Weak bins next to very loud ones (low-frequency bins of loud
    frames, after pre-emphasis) then carry an absolute log-mel error of up to
    ~4e-3 (about 1e-3 after normalization, in ~0.1% of the entries); over a
    whole utterance the relative (Frobenius) error is ~1e-6 to 1e-5.
  * `extract_numpy` (host, float64 spectrum like Hugging Face): matches it to
    ~1e-6; use it where bit-level parity with the reference matters
    (e.g. offline tokenization of a corpus on CPU hosts).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400
HOP_LENGTH = 160
FFT_LENGTH = 512
NUM_MEL_BINS = 80
STRIDE = 2
FEATURE_DIM = NUM_MEL_BINS * STRIDE  # 160
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07
NORM_EPS = 1e-7
WAVE_SCALE = 2.0**15


class FbankOutput(NamedTuple):
  """Stacked filterbank features of a padded batch.

  Attributes:
    features: `[batch, tokens, 160]` float32; zero beyond each sample's frames.
    lengths: `[batch]` int32, emitted tokens per sample (ceil(F / 2)).
    mask: `[batch, tokens]` bool, Hugging Face's attention mask (True for the
      first floor(F / 2) tokens): what the w2v-BERT encoder treats as real.
  """
  features: jax.Array
  lengths: jax.Array
  mask: jax.Array


def num_frames(num_samples):
  """Kaldi frame count F = floor((N - 400) / 160) + 1, or 0 when N < 400 (int or array)."""
  n = np.asarray(num_samples) if not isinstance(num_samples, jax.Array) else num_samples
  lib = jnp if isinstance(n, jax.Array) else np
  return lib.where(n >= FRAME_LENGTH, (n - FRAME_LENGTH) // HOP_LENGTH + 1, 0)


def num_tokens(num_samples):
  """Emitted 50 Hz tokens ceil(F / 2) for N samples (49 for 16000, 499 for 160000)."""
  return (num_frames(num_samples) + 1) // 2


def _hertz_to_kaldi_mel(freq):
  return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
  """Kaldi-style mel filterbank `[257, 80]` (float64), triangles built in mel space.

  Same construction as `transformers.audio_utils.mel_filter_bank(257, 80, 20,
  8000, 16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)`.
  """
  num_bins = FFT_LENGTH // 2 + 1
  mel_edges = np.linspace(_hertz_to_kaldi_mel(20.0), _hertz_to_kaldi_mel(SAMPLE_RATE // 2),
                          NUM_MEL_BINS + 2)
  bin_mels = _hertz_to_kaldi_mel(SAMPLE_RATE / FFT_LENGTH * np.arange(num_bins))
  diff = np.diff(mel_edges)
  slopes = mel_edges[None, :] - bin_mels[:, None]
  down = -slopes[:, :-2] / diff[:-1]
  up = slopes[:, 2:] / diff[1:]
  return np.maximum(0.0, np.minimum(down, up))


@functools.lru_cache(maxsize=None)
def povey_window() -> np.ndarray:
  """Symmetric (not periodic) Povey window of 400 samples: hann(400)^0.85 (float64)."""
  return np.power(np.hanning(FRAME_LENGTH), 0.85)


def log_mel(waveforms: jax.Array) -> jax.Array:
  """Un-normalized Kaldi log-mel energies.

  Args:
    waveforms: `[batch, samples]` float, 16 kHz, in [-1, 1].

  Returns:
    `[batch, frames, 80]` float32 with frames = floor((samples - 400) / 160) + 1.
  """
  x = waveforms.astype(jnp.float32) * WAVE_SCALE
  batch, samples = x.shape
  frames = int(num_frames(samples))
  if frames == 0:
    return jnp.zeros((batch, 0, NUM_MEL_BINS), jnp.float32)
  # Frame f = samples [160 f, 160 f + 400): three consecutive 160-sample chunks
  # (the last one cut to 80), built with slices instead of a gather.
  chunks = frames + 2
  x = jnp.pad(x, ((0, 0), (0, max(0, chunks * HOP_LENGTH - samples))))[:, :chunks * HOP_LENGTH]
  x = x.reshape(batch, chunks, HOP_LENGTH)
  tail = FRAME_LENGTH - 2 * HOP_LENGTH
  framed = jnp.concatenate([x[:, :frames], x[:, 1:frames + 1], x[:, 2:frames + 2, :tail]], axis=-1)
  framed = framed - jnp.mean(framed, axis=-1, keepdims=True)
  framed = jnp.concatenate(
      [framed[..., :1] * (1.0 - PREEMPHASIS), framed[..., 1:] - PREEMPHASIS * framed[..., :-1]], axis=-1)
  framed = framed * jnp.asarray(povey_window(), jnp.float32)
  spectrum = jnp.fft.rfft(framed, n=FFT_LENGTH, axis=-1)
  power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
  mel = jnp.einsum("bfk,km->bfm", power, jnp.asarray(mel_filters(), jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, MEL_FLOOR))


def normalize(log_mels: jax.Array, frame_counts: jax.Array) -> jax.Array:
  """Per-utterance, per-bin (x - mean) / sqrt(var(ddof=1) + 1e-7) over valid frames.

  Args:
    log_mels: `[batch, frames, bins]`.
    frame_counts: `[batch]` valid frames per sample.

  Returns:
    `[batch, frames, bins]`, zero at frames >= frame_counts.
  """
  valid = (jnp.arange(log_mels.shape[1])[None, :] < frame_counts[:, None])[..., None]
  n = frame_counts.astype(jnp.float32)[:, None, None]
  x = jnp.where(valid, log_mels, 0.0)
  mean = jnp.sum(x, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
  centered = jnp.where(valid, log_mels - mean, 0.0)
  var = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  return jnp.where(valid, centered / jnp.sqrt(var + NORM_EPS), 0.0)


def stack_frames(features: jax.Array) -> jax.Array:
  """`[batch, frames, bins]` -> `[batch, ceil(frames / 2), 2 * bins]` (zero frame appended if odd)."""
  batch, frames, bins = features.shape
  if frames % STRIDE:
    features = jnp.pad(features, ((0, 0), (0, STRIDE - frames % STRIDE), (0, 0)))
  return features.reshape(batch, -1, bins * STRIDE)


def extract(waveforms: jax.Array, num_samples: jax.Array | None = None) -> FbankOutput:
  """SeamlessM4T features of a padded batch; each sample uses only its own samples.

  Args:
    waveforms: `[batch, samples]` float 16 kHz audio in [-1, 1], right-padded
      (padding values are ignored).
    num_samples: `[batch]` int, real samples per row (default: all).

  Returns:
    `FbankOutput(features [batch, tokens, 160], lengths [batch], mask
    [batch, tokens])`, tokens = ceil(F_max / 2) for the padded width. A sample
    needs at least 400 samples (one frame) to have features and 2 frames for
    a defined variance (Hugging Face gives NaN there; here the variance of a
    single frame is taken as 0).
  """
  waveforms = jnp.asarray(waveforms)
  batch, samples = waveforms.shape
  if num_samples is None:
    num_samples = jnp.full((batch,), samples, jnp.int32)
  num_samples = jnp.minimum(jnp.asarray(num_samples, jnp.int32), samples)
  frame_counts = num_frames(num_samples).astype(jnp.int32)
  feats = stack_frames(normalize(log_mel(waveforms), frame_counts))
  tokens = jnp.arange(feats.shape[1])[None, :]
  lengths = (frame_counts + 1) // 2
  mask = tokens < (frame_counts // 2)[:, None]
  return FbankOutput(feats, lengths, mask)


extract_jit = jax.jit(extract)


def log_mel_numpy(waveforms: np.ndarray) -> np.ndarray:
  """`log_mel` on the host in float64 (as Hugging Face): `[batch, samples]` -> `[batch, frames, 80]` float64."""
  x = np.asarray(waveforms, np.float64) * WAVE_SCALE
  batch, samples = x.shape
  frames = int(num_frames(samples))
  index = np.arange(frames)[:, None] * HOP_LENGTH + np.arange(FRAME_LENGTH)[None, :]
  framed = x[:, index]
  framed = framed - framed.mean(axis=-1, keepdims=True)
  framed = np.concatenate(
      [framed[..., :1] * (1.0 - PREEMPHASIS), framed[..., 1:] - PREEMPHASIS * framed[..., :-1]], axis=-1)
  framed = framed * povey_window()
  power = np.abs(np.fft.rfft(framed, n=FFT_LENGTH, axis=-1)) ** 2
  return np.log(np.maximum(power @ mel_filters(), MEL_FLOOR))


def extract_numpy(waveforms, num_samples=None) -> FbankOutput:
  """`extract` on the host with a float64 spectrum (Hugging Face parity ~1e-6); numpy outputs."""
  waveforms = np.asarray(waveforms)
  if waveforms.ndim != 2:
    raise ValueError(f"waveforms must be [batch, samples], got shape {waveforms.shape}")
  batch, samples = waveforms.shape
  if num_samples is None:
    num_samples = np.full((batch,), samples)
  num_samples = np.minimum(np.asarray(num_samples, np.int64), samples)
  frame_counts = num_frames(num_samples).astype(np.int64)
  total = int(num_frames(samples))
  log_mels = log_mel_numpy(waveforms) if total else np.zeros((batch, 0, NUM_MEL_BINS))
  valid = (np.arange(total)[None, :] < frame_counts[:, None])[..., None]
  n = frame_counts.astype(np.float64)[:, None, None]
  mean = np.where(valid, log_mels, 0.0).sum(axis=1, keepdims=True) / np.maximum(n, 1.0)
  centered = np.where(valid, log_mels - mean, 0.0)
  var = np.square(centered).sum(axis=1, keepdims=True) / np.maximum(n - 1.0, 1.0)
  feats = np.where(valid, centered / np.sqrt(var + NORM_EPS), 0.0).astype(np.float32)
  if total % STRIDE:
    feats = np.pad(feats, ((0, 0), (0, STRIDE - total % STRIDE), (0, 0)))
  feats = feats.reshape(batch, -1, FEATURE_DIM)
  lengths = ((frame_counts + 1) // 2).astype(np.int32)
  mask = np.arange(feats.shape[1])[None, :] < (frame_counts // 2)[:, None]
  return FbankOutput(feats, lengths, mask)


def pad_waveforms(waveforms, multiple: int = HOP_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  """List of 1-D float arrays -> (`[batch, samples]` float32 zero-padded, `[batch]` int32 lengths).

  The padded width is rounded up to `multiple` samples, which limits the
  number of distinct shapes (jit compilations).
  """
  lengths = np.array([len(w) for w in waveforms], np.int32)
  width = int(-(-max(int(lengths.max()), FRAME_LENGTH) // multiple) * multiple)
  out = np.zeros((len(waveforms), width), np.float32)
  for i, w in enumerate(waveforms):
    out[i, :len(w)] = np.asarray(w, np.float32)
  return out, lengths
