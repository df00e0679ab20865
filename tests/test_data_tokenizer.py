"""The SSL tokenizer interface, log-mel features and the k-means tokenizer."""

import os

import numpy as np
import pytest

from metis_jax.data import fit_kmeans
from metis_jax.data import tokenizer as tk
from tests import conftest


def _speechlike(seconds, seed=0, rate=16000):
  """A chirp with noise and an envelope: varied spectra frame to frame."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  f = 150 + 400 * t / max(seconds, 1e-3) + 30 * np.sin(2 * np.pi * 3 * t)
  x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
  return (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def _random_tokenizer(k=32, seed=0):
  return tk.KMeansTokenizer(np.random.default_rng(seed).standard_normal((k, tk.FEATURE_DIM)).astype(np.float32))


@pytest.mark.parity
def test_features_match_seamless_m4t_extractor():
  """Against `SeamlessM4TFeatureExtractor()` on this chirp (frozen in the hf_fbank fixture)."""
  d = conftest.parity_fixture("hf_fbank", "inputs.npz", "outputs.npz")
  x = _speechlike(2.3)
  np.testing.assert_allclose(np.load(os.path.join(d, "inputs.npz"))["chirp"][0], x, rtol=0, atol=1e-6)
  ref = np.load(os.path.join(d, "outputs.npz"))["input_features_chirp"][0]
  feats, lengths = tk.features_jit(x[None], np.array([len(x)]))
  assert int(lengths[0]) == tk.num_ssl_frames(len(x)) == ref.shape[0] == 114
  np.testing.assert_allclose(np.asarray(feats)[0], ref, atol=2e-3)


def test_tokenize_is_padding_invariant():
  tok = _random_tokenizer()
  a, b = _speechlike(1.0, 1), _speechlike(2.5, 2)
  batch = np.zeros((3, 48000), np.float32)
  batch[0, :len(a)] = a
  batch[1, :len(b)] = b
  tokens, lengths = tok.tokenize(batch, np.array([len(a), len(b), 0]))
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  assert tokens.dtype == np.int32 and tokens.shape == (3, tk.num_ssl_frames(48000))
  np.testing.assert_array_equal(lengths, [49, tk.num_ssl_frames(len(b)), 0])
  alone, alone_len = tok.tokenize(a[None], np.array([len(a)]))
  np.testing.assert_array_equal(tokens[0, :49], np.asarray(alone)[0, :int(alone_len[0])])
  assert np.all(tokens[0, 49:] == 0) and np.all(tokens[2] == 0)
  assert len(np.unique(tokens[1, :lengths[1]])) > 3  # Not a constant output.


def test_save_load_and_protocol(tmp_path):
  tok = _random_tokenizer(16)
  assert isinstance(tok, tk.SSLTokenizer)
  assert (tok.sample_rate, tok.frame_rate, tok.vocab_size) == (16000, 50, 16)
  tok.save(str(tmp_path))
  loaded = tk.load_tokenizer(str(tmp_path))
  assert isinstance(loaded, tk.KMeansTokenizer)
  np.testing.assert_array_equal(loaded.centroids, tok.centroids)
  x = _speechlike(1.2)[None]
  np.testing.assert_array_equal(np.asarray(loaded.tokenize(x, [x.shape[1]])[0]),
                                np.asarray(tok.tokenize(x, [x.shape[1]])[0]))
  with pytest.raises(FileNotFoundError, match="fit_kmeans"):
    tk.load_tokenizer(str(tmp_path / "nothing"))


def test_kmeans_fit_finds_separated_clusters():
  rng = np.random.default_rng(0)
  centers = 10 * rng.standard_normal((8, tk.FEATURE_DIM)).astype(np.float32)
  labels = rng.integers(0, 8, 4000)
  x = centers[labels] + 0.1 * rng.standard_normal((4000, tk.FEATURE_DIM)).astype(np.float32)
  centroids, info = fit_kmeans.fit(x, 8, iterations=10, seed=0)
  # Each true center is matched by one fitted centroid.
  dist = np.linalg.norm(centers[:, None] - centroids[None], axis=-1)
  assert np.all(dist.min(axis=1) < 0.1)
  assert len(set(dist.argmin(axis=1))) == 8
  assert info["mean_sq_distance"] < 1.1 * 0.1 ** 2 * tk.FEATURE_DIM  # The noise variance.
  assert info["mean_sq_distance"] > 0.9 * 0.1 ** 2 * tk.FEATURE_DIM
  with pytest.raises(ValueError, match="kmeans_clusters"):
    fit_kmeans.fit(x[:5], 8, iterations=1)
