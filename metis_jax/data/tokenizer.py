"""The SSL tokenizer interface and a k-means tokenizer that needs no downloads.

The interface (`SSLTokenizer`) is what the tokenization job calls; the
w2v-BERT 2.0 + semantic-codec tokenizer of Metis implements it as well. Both
produce 50 tokens per second with the same count for the same audio:

  F = floor((N - 400) / 160) + 1 frames of 25 ms every 10 ms (N samples at
  16 kHz, no centering), stacked in pairs: T = ceil(F / 2) tokens
  (49 for 1 s, 499 for 10 s); see `num_ssl_frames`.

`KMeansTokenizer`: Kaldi-style log-mel filterbank (80 bins, 20 Hz-8 kHz, povey
window 400, hop 160, FFT 512, pre-emphasis 0.97, DC removal, ln floor
1.1921e-7, waveform x 2^15), per-utterance per-bin mean/variance
normalization, frame pairs stacked to 160 dims at 50 Hz, then the nearest of
k centroids (Euclidean), all in one jitted JAX function. Fit it with
`python -m metis_jax.data.fit_kmeans`. Saved as `tokenizer.json` (type and
settings) + `centroids.npz` (float32 [k, 160]).
"""

import functools
import json
import math
import os
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_RATE = 50
WINDOW = 400  # 25 ms at 16 kHz.
HOP = 160  # 10 ms at 16 kHz.
FFT_SIZE = 512
NUM_MEL_BINS = 80
FEATURE_DIM = 2 * NUM_MEL_BINS  # Frame pairs stacked: 160 at 50 Hz.
LOG_FLOOR = 1.1921e-7
PREEMPHASIS = 0.97
CONFIG_NAME = "tokenizer.json"


def num_feature_frames(num_samples):
  """F = floor((N - 400) / 160) + 1 (0 when N < 400); int or int array."""
  n = np.asarray(num_samples, dtype=np.int64)
  f = np.where(n >= WINDOW, (n - WINDOW) // HOP + 1, 0)
  return int(f) if f.ndim == 0 else f


def num_ssl_frames(num_samples):
  """Tokens of the SSL tokenizer for N samples at 16 kHz: ceil(F / 2).

  49 for 1 s (16000 samples), 499 for 10 s. Works on ints and int arrays.
  """
  f = np.asarray(num_feature_frames(num_samples))
  t = (f + 1) // 2
  return int(t) if t.ndim == 0 else t


@runtime_checkable
class SSLTokenizer(Protocol):
  """What the tokenization job needs from an SSL tokenizer.

  Attributes:
    sample_rate: input rate in Hz (16000).
    frame_rate: tokens per second (50).
    vocab_size: number of distinct token ids (ids are 0..vocab_size-1).
  """
  sample_rate: int
  frame_rate: int
  vocab_size: int

  def tokenize(self, waveforms, lengths) -> tuple[Any, Any]:
    """Tokenizes a padded batch.

    Args:
      waveforms: float32 [batch, samples] at `sample_rate`, zero-padded.
      lengths: int [batch], the real number of samples of each row.

    Returns:
      (tokens int32 [batch, frames], token_lengths int32 [batch]) with
      frames = num_ssl_frames(samples) and token_lengths =
      num_ssl_frames(lengths); tokens past a row's length are 0.
    """

  def save(self, directory: str) -> None:
    """Writes `tokenizer.json` (with a 'type') and its arrays to `directory`."""

  @classmethod
  def load(cls, directory: str) -> "SSLTokenizer":
    """Reads what `save` wrote."""


@runtime_checkable
class AcousticTokenizer(Protocol):
  """Optional acoustic codec tokenizer (24 kHz, q codebooks per frame).

  `tokenize(waveforms float32 [batch, samples], lengths int [batch])` returns
  (tokens int32 [batch, frames, num_quantizers], token_lengths int32 [batch]).
  """
  sample_rate: int
  frame_rate: int
  num_quantizers: int

  def tokenize(self, waveforms, lengths) -> tuple[Any, Any]:
    ...


_REGISTRY: dict[str, type] = {}


def register(type_name: str):
  """Class decorator: `load_tokenizer` builds `type_name` tokenizers with it."""
  def wrap(cls):
    _REGISTRY[type_name] = cls
    return cls
  return wrap


def load_tokenizer(directory: str) -> SSLTokenizer:
  """Loads any registered tokenizer from the directory `save` wrote."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer at {directory!r} (missing {CONFIG_NAME}); "
                            "fit one with `python -m metis_jax.data.fit_kmeans`")
  with open(path, encoding="utf-8") as f:
    kind = json.load(f).get("type")
  if kind not in _REGISTRY:
    hint = (" (model-backed tokenizers register when `metis_jax.frontend.tokenizers` is imported;"
            " load through `tokenizers.load_tokenizer`)")
    raise ValueError(f"{path}: unknown tokenizer type {kind!r}; known: {sorted(_REGISTRY)}{hint}")
  return _REGISTRY[kind].load(directory)


# ---------------------------------------------------------------------------
# Log-mel features (Kaldi fbank conventions).


def _mel(freq):
  return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank(num_bins: int = NUM_MEL_BINS, fft_size: int = FFT_SIZE, sample_rate: int = SAMPLE_RATE,
                   low_hz: float = 20.0, high_hz: float = 8000.0) -> np.ndarray:
  """Kaldi's triangular mel filters as a float32 [fft_size // 2 + 1, num_bins] matrix."""
  fft_bin_hz = sample_rate / fft_size
  mel_low, mel_high = _mel(low_hz), _mel(high_hz)
  delta = (mel_high - mel_low) / (num_bins + 1)
  centers = mel_low + delta * np.arange(num_bins + 2)
  bin_mel = _mel(fft_bin_hz * np.arange(fft_size // 2))  # Kaldi ignores the Nyquist bin.
  left, center, right = centers[:-2, None], centers[1:-1, None], centers[2:, None]
  up = (bin_mel[None] - left) / (center - left)
  down = (right - bin_mel[None]) / (right - center)
  weights = np.maximum(0.0, np.minimum(up, down))  # [num_bins, fft_size // 2]
  out = np.zeros((fft_size // 2 + 1, num_bins), np.float32)
  out[:-1] = weights.T
  return out


def _povey_window(n: int = WINDOW) -> np.ndarray:
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / (n - 1))) ** 0.85


def log_mel_features(waveforms: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normalized, pair-stacked log-mel features.

  Args:
    waveforms: float32 [batch, samples] at 16 kHz in [-1, 1], zero-padded.
    lengths: int [batch] real sample counts.

  Returns:
    (features float32 [batch, frames, 160], token_lengths int32 [batch]) with
    frames = num_ssl_frames(samples); rows past token_lengths are 0.
  """
  batch, samples = waveforms.shape
  f_max = max(num_feature_frames(samples), 1)
  t_max = (f_max + 1) // 2
  x = waveforms.astype(jnp.float32) * 32768.0
  if samples < WINDOW:
    x = jnp.pad(x, ((0, 0), (0, WINDOW - samples)))
  idx = np.arange(f_max)[:, None] * HOP + np.arange(WINDOW)[None, :]
  frames = x[:, idx]  # [B, F, 400]
  frames = frames - frames.mean(axis=-1, keepdims=True)
  prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
  frames = (frames - PREEMPHASIS * prev) * jnp.asarray(_povey_window(), jnp.float32)
  spec = jnp.fft.rfft(frames, n=FFT_SIZE, axis=-1)
  power = spec.real ** 2 + spec.imag ** 2
  mel = jnp.log(jnp.maximum(power @ jnp.asarray(mel_filterbank()), LOG_FLOOR))  # [B, F, 80]
  lengths = lengths.astype(jnp.int32)
  num_frames = jnp.where(lengths >= WINDOW, (lengths - WINDOW) // HOP + 1, 0)
  valid = (jnp.arange(f_max)[None, :] < num_frames[:, None])[..., None]
  count = jnp.maximum(num_frames, 1)[:, None, None].astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, mel, 0.0), axis=1, keepdims=True) / count
  var = jnp.sum(jnp.where(valid, (mel - mean) ** 2, 0.0), axis=1, keepdims=True) / jnp.maximum(count - 1, 1)
  mel = jnp.where(valid, (mel - mean) / jnp.sqrt(var + 1e-7), 0.0)
  if f_max % 2:
    mel = jnp.pad(mel, ((0, 0), (0, 1), (0, 0)))
  feats = mel.reshape(batch, t_max, FEATURE_DIM)
  token_lengths = (num_frames + 1) // 2
  return feats, token_lengths


def nearest_centroid(features: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Index and squared distance of the nearest centroid.

  Args:
    features: float32 [..., D].
    centroids: float32 [K, D].

  Returns:
    (ids int32 [...], squared distances float32 [...]).
  """
  c = centroids.astype(jnp.float32)
  scores = features @ c.T - 0.5 * jnp.sum(c * c, axis=-1)
  ids = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  best = jnp.take_along_axis(scores, ids[..., None], axis=-1)[..., 0]
  dist = jnp.maximum(jnp.sum(features * features, axis=-1) - 2.0 * best, 0.0)
  return ids, dist


@jax.jit
def _kmeans_tokenize(centroids, waveforms, lengths):
  feats, token_lengths = log_mel_features(waveforms, lengths)
  ids, _ = nearest_centroid(feats, centroids)
  valid = jnp.arange(ids.shape[1])[None, :] < token_lengths[:, None]
  return jnp.where(valid, ids, 0), token_lengths


features_jit = jax.jit(log_mel_features)


@register("kmeans")
class KMeansTokenizer:
  """Log-mel k-means tokenizer (see the module docstring).

  Attributes:
    centroids: float32 [k, 160].
    info: extra fields saved with it (how it was fitted).
  """
  sample_rate = SAMPLE_RATE
  frame_rate = FRAME_RATE

  def __init__(self, centroids: np.ndarray, info: dict[str, Any] | None = None):
    centroids = np.asarray(centroids, np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != FEATURE_DIM:
      raise ValueError(f"k-means centroids must be [k, {FEATURE_DIM}], got {centroids.shape}")
    self.centroids = centroids
    self.info = dict(info or {})
    self._device_centroids = None

  @property
  def vocab_size(self) -> int:
    return int(self.centroids.shape[0])

  def tokenize(self, waveforms, lengths) -> tuple[jax.Array, jax.Array]:
    """See `SSLTokenizer.tokenize`; runs jitted (sharded inputs stay sharded)."""
    if self._device_centroids is None:
      self._device_centroids = jnp.asarray(self.centroids)
    return _kmeans_tokenize(self._device_centroids, jnp.asarray(waveforms, jnp.float32),
                            jnp.asarray(lengths, jnp.int32))

  def config(self) -> dict[str, Any]:
    """What `tokenizer.json` holds."""
    return {"type": "kmeans", "version": 1, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
            "vocab_size": self.vocab_size,
            "features": {"num_mel_bins": NUM_MEL_BINS, "window": WINDOW, "hop": HOP, "fft_size": FFT_SIZE,
                         "preemphasis": PREEMPHASIS, "stack": 2, "normalize": "per-utterance"},
            "info": self.info}

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, "centroids.npz"), centroids=self.centroids)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
      json.dump(self.config(), f, indent=1)

  @classmethod
  def load(cls, directory: str) -> "KMeansTokenizer":
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
      cfg = json.load(f)
    if cfg.get("type") != "kmeans":
      raise ValueError(f"{directory}: tokenizer type {cfg.get('type')!r} is not 'kmeans'")
    with np.load(os.path.join(directory, "centroids.npz")) as z:
      centroids = z["centroids"]
    if centroids.shape[0] != cfg["vocab_size"]:
      raise ValueError(f"{directory}: {centroids.shape[0]} centroids but vocab_size {cfg['vocab_size']}")
    return cls(centroids, cfg.get("info"))


def describe(tokenizer) -> dict[str, Any]:
  """A JSON-able description of a tokenizer for manifests."""
  desc = {"class": type(tokenizer).__name__, "sample_rate": int(tokenizer.sample_rate),
          "frame_rate": int(tokenizer.frame_rate), "vocab_size": int(tokenizer.vocab_size)}
  if hasattr(tokenizer, "config"):
    cfg = tokenizer.config()
    desc["type"] = cfg.get("type")
  return desc


def seconds_to_tokens(seconds: float) -> int:
  """Tokens for a duration (50 Hz, same rule as `num_ssl_frames`)."""
  return num_ssl_frames(int(math.floor(seconds * SAMPLE_RATE)))
