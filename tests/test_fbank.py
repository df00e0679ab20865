"""SeamlessM4T filterbank front-end (`metis_jax.fbank`) against Hugging Face's feature extractor.

The comparisons read the frozen fixture `../shared/data/parity/hf_fbank` (transformers
4.41.2's `SeamlessM4TFeatureExtractor()`, see its README); with transformers installed,
an optional live comparison runs on every recording of `../shared/data/speech` as well.
"""

import glob
import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from metis_jax.frontend import fbank
from tests import conftest
from tests.conftest import SPEECH, require_dir


def load_16k(path: str) -> np.ndarray:
  """Mono float32 at 16 kHz (stereo down-mixed, 24 k / 44.1 k resampled with resample_poly)."""
  wave, rate = sf.read(path, dtype="float32", always_2d=True)
  wave = wave.mean(axis=1)
  g = math.gcd(rate, fbank.SAMPLE_RATE)
  return signal.resample_poly(wave, fbank.SAMPLE_RATE // g, rate // g).astype(np.float32)


def speech_files() -> list[str]:
  return sorted(glob.glob(os.path.join(require_dir(SPEECH), "*.wav")))


@pytest.fixture(scope="module")
def hf_fbank():
  """(config, inputs, outputs) of the `hf_fbank` fixture."""
  d = conftest.parity_fixture("hf_fbank", "config.json", "inputs.npz", "outputs.npz")
  with open(os.path.join(d, "config.json")) as f:
    config = json.load(f)
  return config, dict(np.load(os.path.join(d, "inputs.npz"))), dict(np.load(os.path.join(d, "outputs.npz")))


def assert_matches_reference(ref, ref_mask, wave, num_samples):
  """Both paths on `wave [B, N]` against Hugging Face's `ref [B, T, 160]`, `ref_mask [B, T]`.

  Host path (float64 spectrum, as Hugging Face): elementwise, 1e-4 of the
  largest value. Device path (float32 spectrum): relative (Frobenius) error
  1e-4, plus a bound on the few weak bins float32 cannot resolve (see the
  module docstring of `fbank`).
  """
  jax_out = fbank.extract_jit(wave, num_samples)
  np_out = fbank.extract_numpy(wave, num_samples)
  for out in (np_out, jax_out):
    assert out.features.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(out.mask), ref_mask)
    np.testing.assert_array_equal(np.asarray(out.lengths), fbank.num_tokens(num_samples))
  assert np.abs(np_out.features - ref).max() / np.abs(ref).max() < 1e-4
  ours = np.asarray(jax_out.features)
  assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
  assert np.abs(ours - ref).max() < 5e-3


def test_window_and_filterbank_follow_kaldi_formulas():
  n = np.arange(400)
  np.testing.assert_allclose(fbank.povey_window(), (0.5 - 0.5 * np.cos(2 * np.pi * n / 399)) ** 0.85,
                             rtol=0, atol=1e-12)
  mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
  lo, hi = mel(20.0), mel(8000.0)
  edges = [lo + (hi - lo) * i / 81 for i in range(82)]
  want = np.zeros((257, 80))
  for k in range(257):
    m = mel(16000 / 512 * k)
    for b in range(80):
      left, center, right = edges[b:b + 3]
      if left < m <= center:
        want[k, b] = (m - left) / (center - left)
      elif center < m < right:
        want[k, b] = (right - m) / (right - center)
  np.testing.assert_allclose(fbank.mel_filters(), want, rtol=0, atol=1e-12)


def speechlike_chirp(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
  """The fixture's synthetic signal (formula in hf_fbank/config.json): a chirp with noise and an envelope."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  f = 150 + 400 * t / max(seconds, 1e-3) + 30 * np.sin(2 * np.pi * 3 * t)
  x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
  return (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parity
def test_fixture_inputs_are_the_described_clips(hf_fbank):
  """The fixture's waveforms are `load_16k` of the clips its config names (and the chirp formula)."""
  config, inputs, _ = hf_fbank
  for i, clip in enumerate(config["batch_clips"]):
    path = conftest.require_file(os.path.join(SPEECH, clip["file"]))
    n = clip["num_samples"]
    assert inputs["num_samples"][i] == n
    np.testing.assert_allclose(inputs["wav"][i, :n], load_16k(path)[clip["start"]:clip["start"] + n],
                               rtol=0, atol=1e-6)
    assert not inputs["wav"][i, n:].any()
  np.testing.assert_allclose(inputs["chirp"][0], speechlike_chirp(2.3), rtol=0, atol=1e-6)


@pytest.mark.parity
def test_batch_matches_hf_fixture(hf_fbank):
  """Three real clips in one padded call (one has an odd frame count: the half-padded token)."""
  _, inputs, expected = hf_fbank
  wave, num_samples = inputs["wav"].copy(), inputs["num_samples"]
  np.testing.assert_array_equal(expected["attention_mask"].sum(1), [109, 102, 99])
  # Garbage in the padding must not leak into any sample's features.
  wave[np.arange(wave.shape[1])[None, :] >= num_samples[:, None]] = 0.5
  assert_matches_reference(expected["input_features"], expected["attention_mask"].astype(bool), wave,
                           num_samples)


@pytest.mark.parity
def test_single_clips_match_hf_fixture(hf_fbank):
  """A clip with an odd frame count alone (its last token masked), and the synthetic chirp."""
  _, inputs, expected = hf_fbank
  i, n = int(inputs["alone_index"]), int(inputs["num_samples"][int(inputs["alone_index"])])
  assert fbank.num_frames(n) % 2 == 1
  alone_mask = expected["attention_mask_alone"].astype(bool)
  assert alone_mask.sum() == alone_mask.shape[1] - 1 == 102
  assert_matches_reference(expected["input_features_alone"], alone_mask, inputs["wav"][i:i + 1, :n],
                           np.array([n]))
  chirp = inputs["chirp"]
  assert_matches_reference(expected["input_features_chirp"], expected["attention_mask_chirp"].astype(bool),
                           chirp, np.array([chirp.shape[1]]))


@pytest.fixture(scope="module")
def live_extractor():
  transformers = pytest.importorskip("transformers", reason="optional live comparison: transformers is not installed")
  # Default arguments: no download, no files (checks it constructs offline).
  return transformers.SeamlessM4TFeatureExtractor()


def test_filterbank_and_window_match_live_hf(live_extractor):
  np.testing.assert_allclose(fbank.mel_filters(), live_extractor.mel_filters, rtol=0, atol=1e-12)
  np.testing.assert_allclose(fbank.povey_window(), live_extractor.window, rtol=0, atol=1e-12)


@pytest.mark.parity
def test_matches_live_hf_on_real_speech(live_extractor):
  """Optional: every recording (resampled, the stereo one down-mixed), alone, against the installed extractor."""
  for path in speech_files():
    wave = load_16k(path)
    ref = live_extractor(wave, sampling_rate=16000, return_tensors="np", padding=True)
    assert_matches_reference(ref["input_features"], ref["attention_mask"].astype(bool), wave[None],
                             np.array([len(wave)]))


def test_frame_and_token_counts():
  assert int(fbank.num_tokens(16000)) == 49
  assert int(fbank.num_tokens(160000)) == 499
  np.testing.assert_array_equal(fbank.num_frames(np.array([0, 399, 400, 559, 560, 16000])),
                                [0, 0, 1, 1, 2, 98])
  out = fbank.extract(np.zeros((2, 1200), np.float32), np.array([1200, 560]))
  assert out.features.shape == (2, 3, 160)  # F = 6 for the padded width
  np.testing.assert_array_equal(out.lengths, [3, 1])
  np.testing.assert_array_equal(out.mask, [[True, True, True], [True, False, False]])


def test_padding_does_not_change_a_sample():
  rng = np.random.default_rng(0)
  wave = (0.1 * rng.standard_normal(8000)).astype(np.float32)
  alone = fbank.extract_jit(wave[None])
  padded = np.concatenate([wave, rng.standard_normal(3000).astype(np.float32)])[None]
  other = (0.3 * rng.standard_normal(11000)).astype(np.float32)[None]
  out = fbank.extract_jit(np.concatenate([padded, other]), np.array([8000, 11000]))
  t = alone.features.shape[1]
  # Float32 round-off only (other reduction and FFT batch shapes); leaking
  # padding into the statistics would change features by ~0.1.
  np.testing.assert_allclose(np.asarray(out.features[0, :t]), np.asarray(alone.features[0]), atol=1e-4)
  assert not np.asarray(out.features[0, t:]).any()
  assert int(out.lengths[0]) == int(alone.lengths[0]) == t
  np_alone = fbank.extract_numpy(wave[None]).features[0]
  np_out = fbank.extract_numpy(np.concatenate([padded, other]), np.array([8000, 11000])).features[0]
  np.testing.assert_allclose(np_out[:t], np_alone, atol=1e-6)
