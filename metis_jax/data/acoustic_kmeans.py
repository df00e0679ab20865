"""A residual k-means acoustic tokenizer: 24 kHz log-mel frames -> Q layers of codes, no downloads.

For the demo corpus of S2A (`metis_jax.data.demo`), where no trained
acoustic codec is available offline. It has the frame grid of the codec
(24 kHz, hop 480: N samples give N // 480 frames at 50 Hz) and the codec's
residual structure: layer 0 is the nearest of C centroids to the frame's
standardized log-mel vector, layer q the nearest of C centroids to what the
layers below left over. Coarse layers carry the spectral envelope, fine
layers ever smaller residual detail, as in a residual-VQ codec, so an S2A
model has something real to learn at every layer. It is *not* a codec: the
codes do not decode back to a waveform.

Features: Hann window of 960 samples centred on each 480-sample hop (the
signal padded by 240 on both sides), FFT 1024, 80 Kaldi-style mel bins over
20 Hz - 12 kHz, natural log (floor 1e-8), standardized per bin with the
corpus mean and std of the fit. Saved as `acoustic_tokenizer.json` +
`codebooks.npz` (float32 [Q, C, 80], mean and std [80]).
"""

import json
import os
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.data import tokenizer as tokenizer_lib

SAMPLE_RATE = 24000
HOP = 480
WINDOW = 960
FFT_SIZE = 1024
NUM_MEL_BINS = 80
LOG_FLOOR = 1e-8
CONFIG_NAME = "acoustic_tokenizer.json"


def log_mel(waveforms: jax.Array) -> jax.Array:
  """float32 [batch, samples] at 24 kHz -> unnormalized log-mel [batch, samples // 480, 80]."""
  frames_count = waveforms.shape[1] // HOP
  pad = (WINDOW - HOP) // 2
  x = jnp.pad(waveforms.astype(jnp.float32), ((0, 0), (pad, pad + HOP)))
  idx = np.arange(frames_count)[:, None] * HOP + np.arange(WINDOW)[None, :]
  window = np.hanning(WINDOW + 1)[:-1].astype(np.float32)
  spec = jnp.fft.rfft(x[:, idx] * window, n=FFT_SIZE, axis=-1)
  power = spec.real ** 2 + spec.imag ** 2
  fbank = tokenizer_lib.mel_filterbank(NUM_MEL_BINS, FFT_SIZE, SAMPLE_RATE, 20.0, SAMPLE_RATE / 2)
  return jnp.log(jnp.maximum(power @ jnp.asarray(fbank), LOG_FLOOR))


def residual_codes(features: jax.Array, codebooks: jax.Array) -> jax.Array:
  """Residual quantization: features `[..., D]`, codebooks `[Q, C, D]` -> int32 codes `[..., Q]`."""
  codes = []
  residual = features
  for q in range(codebooks.shape[0]):
    ids, _ = tokenizer_lib.nearest_centroid(residual, codebooks[q])
    residual = residual - jnp.take(codebooks[q], ids, axis=0)
    codes.append(ids)
  return jnp.stack(codes, axis=-1)


@jax.jit
def _tokenize(codebooks, mean, std, waveforms, lengths):
  feats = (log_mel(waveforms) - mean) / std
  codes = residual_codes(feats, codebooks)
  frames = (lengths // HOP).astype(jnp.int32)
  valid = jnp.arange(codes.shape[1])[None, :] < frames[:, None]
  return jnp.where(valid[..., None], codes, 0), frames


class ResidualKMeansAcousticTokenizer:
  """The `tokenizer.AcousticTokenizer` interface over a fitted residual k-means (module docstring).

  Attributes:
    codebooks: float32 [Q, C, 80].
    mean, std: float32 [80], the feature standardization.
    info: how it was fitted.
  """
  sample_rate = SAMPLE_RATE
  frame_rate = SAMPLE_RATE // HOP

  def __init__(self, codebooks: np.ndarray, mean: np.ndarray, std: np.ndarray,
               info: Optional[dict[str, Any]] = None):
    self.codebooks = np.asarray(codebooks, np.float32)
    if self.codebooks.ndim != 3 or self.codebooks.shape[2] != NUM_MEL_BINS:
      raise ValueError(f"codebooks must be [Q, C, {NUM_MEL_BINS}], got {self.codebooks.shape}")
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.info = dict(info or {})

  @property
  def num_quantizers(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def codebook_size(self) -> int:
    return int(self.codebooks.shape[1])

  def tokenize(self, waveforms, lengths) -> tuple[jax.Array, jax.Array]:
    """float32 [batch, samples] at 24 kHz, lengths [batch] -> (codes int32 [batch, samples // 480, Q]
    (0 past each length), frames [batch] = lengths // 480)."""
    return _tokenize(jnp.asarray(self.codebooks), jnp.asarray(self.mean), jnp.asarray(self.std),
                     jnp.asarray(waveforms, jnp.float32), jnp.asarray(lengths, jnp.int32))

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, "codebooks.npz"), codebooks=self.codebooks, mean=self.mean, std=self.std)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
      json.dump({"type": "residual_kmeans", "sample_rate": SAMPLE_RATE, "hop": HOP,
                 "num_quantizers": self.num_quantizers, "codebook_size": self.codebook_size,
                 "info": self.info}, f, indent=1)

  @classmethod
  def load(cls, directory: str) -> "ResidualKMeansAcousticTokenizer":
    with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
      cfg = json.load(f)
    with np.load(os.path.join(directory, "codebooks.npz")) as z:
      return cls(z["codebooks"], z["mean"], z["std"], cfg.get("info"))


def corpus_features(cfg, input_path: str, max_frames: int, seed: int = 0) -> np.ndarray:
  """Unnormalized log-mel frames of a corpus: float32 [n, 80], at most `max_frames` (sampled)."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  from metis_jax.data import readers, tokenize  # pylint: disable=import-outside-toplevel
  feats = []
  with concurrent.futures.ThreadPoolExecutor(max(1, cfg.decode_threads)) as pool:
    for unit in readers.plan_units(input_path, cfg.layout, cfg.files_per_shard):
      decoded, _ = tokenize.decode_unit(unit, cfg, (SAMPLE_RATE,), pool)
      for d in decoded:  # utterances one by one: a few seconds each, compiled per length
        wave = d.waves[SAMPLE_RATE]
        padded = -(-len(wave) // (2 * SAMPLE_RATE)) * 2 * SAMPLE_RATE  # 2 s buckets: few compilations
        batch = np.zeros((1, padded), np.float32)
        batch[0, :len(wave)] = wave
        feats.append(np.asarray(_log_mel_jit(batch))[0, :len(wave) // HOP])
  if not feats:
    raise ValueError(f"no usable audio in {input_path!r}")
  x = np.concatenate(feats)
  if len(x) > max_frames:
    x = x[np.random.default_rng(seed).choice(len(x), max_frames, replace=False)]
  return x


_log_mel_jit = jax.jit(log_mel)


def fit(features: np.ndarray, num_quantizers: int, codebook_size: int, iterations: int, seed: int = 0,
        log: Callable[[str], None] = lambda s: None) -> ResidualKMeansAcousticTokenizer:
  """Fits layer by layer: k-means of the standardized features, then of each layer's residual."""
  from metis_jax.data import fit_kmeans  # pylint: disable=import-outside-toplevel
  mean, std = features.mean(0), features.std(0) + 1e-5
  residual = ((features - mean) / std).astype(np.float32)
  books = []
  for q in range(num_quantizers):
    centroids, info = fit_kmeans.fit(residual, codebook_size, iterations, seed + q)
    ids, _ = tokenizer_lib.nearest_centroid(jnp.asarray(residual), jnp.asarray(centroids))
    residual = residual - centroids[np.asarray(ids)]
    books.append(centroids)
    log(f"acoustic k-means: layer {q + 1}/{num_quantizers}: mean squared residual "
        f"{float(np.mean(np.sum(residual ** 2, -1))):.3f} (from {info['mean_sq_distance']:.3f} fit)")
  return ResidualKMeansAcousticTokenizer(np.stack(books), mean, std,
                                         {"frames": int(len(features)), "iterations": int(iterations),
                                          "seed": int(seed)})


def fit_tokenizer(cfg, input_path: str, output_dir: str, num_quantizers: int, codebook_size: int,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                  ) -> ResidualKMeansAcousticTokenizer:
  """Fits on a corpus (`config.data`: readers, kmeans_iterations, kmeans_max_frames, seed) and saves."""
  x = corpus_features(cfg, input_path, cfg.kmeans_max_frames, cfg.seed)
  tok = fit(x, num_quantizers, codebook_size, cfg.kmeans_iterations, cfg.seed, log)
  tok.info["corpus"] = input_path
  tok.save(output_dir)
  log(f"acoustic k-means: saved {num_quantizers} x {codebook_size} codebooks ({len(x)} frames) to {output_dir}")
  return tok
