"""SeamlessM4T filterbank front-end (`metis_jax.fbank`) against Hugging Face's feature extractor."""

import glob
import math
import os

import numpy as np
import pytest

from metis_jax.frontend import fbank
from tests.conftest import SPEECH, require_dir

transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")
signal = pytest.importorskip("scipy.signal")


def load_16k(path: str) -> np.ndarray:
  """Mono float32 at 16 kHz (stereo down-mixed, 24 k / 44.1 k resampled with resample_poly)."""
  wave, rate = sf.read(path, dtype="float32", always_2d=True)
  wave = wave.mean(axis=1)
  g = math.gcd(rate, fbank.SAMPLE_RATE)
  return signal.resample_poly(wave, fbank.SAMPLE_RATE // g, rate // g).astype(np.float32)


def speech_files() -> list[str]:
  return sorted(glob.glob(os.path.join(require_dir(SPEECH), "*.wav")))


@pytest.fixture(scope="module")
def extractor():
  # Default arguments: no download, no files (checks it constructs offline).
  return transformers.SeamlessM4TFeatureExtractor()


def hf_features(extractor, waves):
  out = extractor(waves, sampling_rate=16000, return_tensors="np", padding=True)
  return out["input_features"], out["attention_mask"].astype(bool)


def test_filterbank_and_window_match_hf(extractor):
  np.testing.assert_allclose(fbank.mel_filters(), extractor.mel_filters, rtol=0, atol=1e-12)
  np.testing.assert_allclose(fbank.povey_window(), extractor.window, rtol=0, atol=1e-12)


def test_frame_and_token_counts():
  assert int(fbank.num_tokens(16000)) == 49
  assert int(fbank.num_tokens(160000)) == 499
  np.testing.assert_array_equal(fbank.num_frames(np.array([0, 399, 400, 559, 560, 16000])),
                                [0, 0, 1, 1, 2, 98])
  out = fbank.extract(np.zeros((2, 1200), np.float32), np.array([1200, 560]))
  assert out.features.shape == (2, 3, 160)  # F = 6 for the padded width
  np.testing.assert_array_equal(out.lengths, [3, 1])
  np.testing.assert_array_equal(out.mask, [[True, True, True], [True, False, False]])


def test_matches_hf_on_real_speech(extractor):
  """Every recording (resampled, the stereo one down-mixed), alone and in one padded batch."""
  waves = [load_16k(p) for p in speech_files()]
  assert any(len(w) % 160 for w in waves)
  batch, lengths = fbank.pad_waveforms(waves)
  # Garbage in the padding must not leak into any sample's features.
  batch[np.arange(batch.shape[1])[None, :] >= lengths[:, None]] = 0.5
  jax_out = fbank.extract_jit(batch, lengths)
  np_out = fbank.extract_numpy(batch, lengths)
  odd_seen = False
  for i, wave in enumerate(waves):
    ref, ref_mask = hf_features(extractor, wave)
    ref, ref_mask = ref[0], ref_mask[0]
    t = ref.shape[0]
    odd_seen |= bool(fbank.num_frames(len(wave)) % 2)
    assert int(jax_out.lengths[i]) == t == int(np_out.lengths[i])
    np.testing.assert_array_equal(np.asarray(jax_out.mask[i, :t]), ref_mask)
    np.testing.assert_array_equal(np_out.mask[i, :t], ref_mask)
    assert not np.asarray(jax_out.mask[i, t:]).any()
    assert not np.asarray(jax_out.features[i, t:]).any() and not np_out.features[i, t:].any()
    scale = np.abs(ref).max()
    # Host path (float64 spectrum, as Hugging Face): elementwise.
    assert np.abs(np_out.features[i, :t] - ref).max() / scale < 1e-4
    # Device path (float32 spectrum): relative (Frobenius) error, plus a bound
    # on the few weak bins float32 cannot resolve (see the module docstring).
    ours = np.asarray(jax_out.features[i, :t])
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
    assert np.abs(ours - ref).max() < 5e-3
  assert odd_seen, "no recording with an odd frame count: the half-token mask is untested"


def test_batch_matches_hf_batch(extractor):
  """Hugging Face's own padded batch (features, zero padding and attention mask) is reproduced."""
  waves = [load_16k(p)[:n] for p, n in zip(speech_files()[:3], (16000, 12300, 7000))]
  ref, ref_mask = hf_features(extractor, waves)
  batch, lengths = fbank.pad_waveforms(waves)
  ours = fbank.extract_numpy(batch, lengths)
  ours_jax = fbank.extract_jit(batch, lengths)
  assert ours.features.shape == ref.shape
  np.testing.assert_array_equal(ours.mask, ref_mask)
  np.testing.assert_array_equal(np.asarray(ours_jax.mask), ref_mask)
  assert np.abs(ours.features - ref).max() / np.abs(ref).max() < 1e-4
  assert np.linalg.norm(np.asarray(ours_jax.features) - ref) / np.linalg.norm(ref) < 1e-4


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
