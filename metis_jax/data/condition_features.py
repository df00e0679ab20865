"""Frame-level condition features for the fine-tuning tasks, in numpy (Grain workers run no JAX).

Audio conditions (SE, TSE, VC, Omni). At full size the trainer computes
normalized w2v-BERT 2.0 layer-17 features (1024-d, 50 Hz) inside the step
from the batch's 16 kHz `cond_audio`. Tiny configs use a cheaper feature,
`cheap_condition_features`: the k-means tokenizer's own features
(`tokenizer.log_mel_features`: Kaldi 80-bin log-mel, 25 ms / 10 ms frames,
per-utterance per-bin mean/variance normalization, frame pairs stacked), so
160-d at 50 Hz, frame t aligned with SSL token t. It is the same function in
numpy (equal to the JAX one within 1e-4) so the data pipeline can emit
features instead of audio.

Visual conditions (L2S): 768-d lip features at 25 fps from a user's lip
encoder, `interpolate_x2` to 50 Hz exactly as the released L2S model does
(linear, align_corners=False):
  out[2k]   = 0.75 v[k] + 0.25 v[max(k - 1, 0)]
  out[2k+1] = 0.75 v[k] + 0.25 v[min(k + 1, T - 1)].
The demo corpus has no video, so `synthetic_visual_features` stands in for a
lip encoder: 80-bin log-mel frames (100 Hz) averaged in groups of 4 (25 fps),
normalized per utterance, times a fixed random projection 80 -> 768 (seed 0,
N(0, 1/80)). They carry the audio's content the way lip features carry some
of it, deterministically.
"""

import functools

import numpy as np

from metis_jax.data import tokenizer as tk

VISUAL_DIM = 768
VISUAL_FPS = 25
CHEAP_DIM = tk.FEATURE_DIM  # 160


def _log_mel_frames(wav: np.ndarray) -> np.ndarray:
  """Kaldi log-mel frames `[F, 80]` of one 16 kHz waveform `[n]` (no normalization)."""
  x = np.asarray(wav, np.float32) * 32768.0
  f = tk.num_feature_frames(len(x))
  if f == 0:
    return np.zeros((0, tk.NUM_MEL_BINS), np.float32)
  idx = np.arange(f)[:, None] * tk.HOP + np.arange(tk.WINDOW)[None, :]
  frames = x[idx]
  frames = frames - frames.mean(axis=-1, keepdims=True)
  prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=-1)
  frames = (frames - tk.PREEMPHASIS * prev) * tk._povey_window().astype(np.float32)  # pylint: disable=protected-access
  spec = np.fft.rfft(frames, n=tk.FFT_SIZE, axis=-1)
  power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
  return np.log(np.maximum(power @ tk.mel_filterbank(), tk.LOG_FLOOR)).astype(np.float32)


def _normalize(frames: np.ndarray) -> np.ndarray:
  """Per-bin mean/variance normalization over frames `[F, D]` (unbiased variance, as the tokenizer)."""
  if len(frames) == 0:
    return frames
  mean = frames.mean(axis=0, keepdims=True)
  var = ((frames - mean) ** 2).sum(axis=0, keepdims=True) / max(len(frames) - 1, 1)
  return ((frames - mean) / np.sqrt(var + 1e-7)).astype(np.float32)


def cheap_condition_features(wav16k: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The tiny configs' condition features (module doc) for a padded batch.

  Args:
    wav16k: float32 [batch, samples] at 16 kHz, zero after each row's length.
    lengths: int [batch] real samples per row.

  Returns:
    (features float32 [batch, frames50hz, 160], frame_lengths int32 [batch]),
    frames50hz = num_ssl_frames(samples); rows are 0 past their length.
  """
  wav16k = np.asarray(wav16k, np.float32)
  batch, samples = wav16k.shape
  frames = tk.num_ssl_frames(samples)
  out = np.zeros((batch, frames, CHEAP_DIM), np.float32)
  out_lengths = np.zeros((batch,), np.int32)
  for b in range(batch):
    n = int(lengths[b])
    mel = _normalize(_log_mel_frames(wav16k[b, :n]))
    if len(mel) % 2:
      mel = np.concatenate([mel, np.zeros((1, mel.shape[1]), np.float32)])
    feats = mel.reshape(-1, CHEAP_DIM)
    out[b, :len(feats)] = feats
    out_lengths[b] = len(feats)
  return out, out_lengths


def interpolate_x2(visual: np.ndarray) -> np.ndarray:
  """25 fps features `[T, D]` -> 50 Hz `[2T, D]` (the formula of the module doc)."""
  v = np.asarray(visual, np.float32)
  if len(v) == 0:
    return np.zeros((0,) + v.shape[1:], np.float32)
  prev = v[np.maximum(np.arange(len(v)) - 1, 0)]
  nxt = v[np.minimum(np.arange(len(v)) + 1, len(v) - 1)]
  out = np.empty((2 * len(v),) + v.shape[1:], np.float32)
  out[0::2] = 0.75 * v + 0.25 * prev
  out[1::2] = 0.75 * v + 0.25 * nxt
  return out


@functools.lru_cache(maxsize=None)
def _visual_projection(dim: int) -> np.ndarray:
  return (np.random.default_rng(0).standard_normal((tk.NUM_MEL_BINS, dim)) / np.sqrt(tk.NUM_MEL_BINS)).astype(
      np.float32)


def synthetic_visual_features(wav16k: np.ndarray, dim: int = VISUAL_DIM) -> np.ndarray:
  """Stand-in lip features `[ceil(F / 4), dim]` at 25 fps for one 16 kHz waveform `[n]` (module doc)."""
  mel = _log_mel_frames(wav16k)
  groups = -(-len(mel) // 4)
  pad = np.concatenate([mel, np.repeat(mel[-1:], groups * 4 - len(mel), axis=0)]) if len(mel) else mel
  frames = _normalize(pad.reshape(groups, 4, -1).mean(axis=1))
  return (frames @ _visual_projection(dim)).astype(np.float32)
