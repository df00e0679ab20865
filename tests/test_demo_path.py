"""From the default job to audio: a deterministic demo, fingerprints and the compatibility check,
the Griffin-Lim mel renderer, and the decode bundle's check."""

import json
import os

import numpy as np
import pytest

from metis_jax.data import acoustic_kmeans, demo, demo_corpus, fingerprint
from metis_jax.data import tokenizer as tokenizer_lib
from metis_jax.inference import demo_bundle, evaluation, mel_renderer


def _corpus_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
  return out


def test_demo_corpus_is_byte_identical_whatever_the_process_synthesized_before(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  demo_corpus.generate(a, languages=("es",), speakers_per_language=2, sentences_per_speaker=2)
  # libespeak-ng carries state from one utterance to the next inside a process: synthesize
  # something else here first; the isolated generation must not notice.
  demo_corpus.Espeak.get().synthesize("Algo completamente distinto.", "es+f3", 180, 60)
  demo_corpus.generate(b, languages=("es",), speakers_per_language=2, sentences_per_speaker=2)
  bytes_a, bytes_b = _corpus_bytes(a), _corpus_bytes(b)
  assert len(bytes_a) == 12 and bytes_a == bytes_b
  assert fingerprint.folder_fingerprint(a) == fingerprint.folder_fingerprint(b)


def _kmeans_tokenizer(tmp_path, name, centroids, corpus="/somewhere"):
  tok = tokenizer_lib.KMeansTokenizer(centroids, {"corpus": corpus, "seed": 0})
  path = str(tmp_path / name)
  tok.save(path)
  return path


def test_fingerprint_follows_content_not_zip_timestamps_or_the_corpus_path(tmp_path):
  c = np.random.default_rng(0).normal(size=(8, tokenizer_lib.FEATURE_DIM)).astype(np.float32)
  a = _kmeans_tokenizer(tmp_path, "a", c, "/corpus/one")
  os.utime(os.path.join(a, "centroids.npz"), (1, 1))
  b = _kmeans_tokenizer(tmp_path, "b", c, "/corpus/two")
  fp = fingerprint.fingerprint(a)
  assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 16
  assert fingerprint.fingerprint(b) == fp
  c2 = c.copy()
  c2[3, 7] += 1e-3
  assert fingerprint.fingerprint(_kmeans_tokenizer(tmp_path, "c", c2)) != fp
  # A file's fingerprint is its bytes.
  f = tmp_path / "codec.safetensors"
  f.write_bytes(b"abc")
  import hashlib
  assert fingerprint.fingerprint(str(f)) == "sha256:" + hashlib.sha256(b"abc").hexdigest()[:16]


def test_check_compatible_names_the_part_that_does_not_belong():
  tok = {"path": "/t", "fingerprint": "sha256:aaaa"}
  other = {"path": "/t2", "fingerprint": "sha256:bbbb"}
  s2a = {"path": "/s2a", "trained_on": {"ssl_tokenizer": "sha256:aaaa", "acoustic_tokenizer": "sha256:cccc"}}
  stage1 = {"path": "/w", "trained_on": {"ssl_tokenizer": "sha256:aaaa"}}
  fingerprint.check_compatible({"stage1": stage1, "s2a_full": s2a, "ssl_tokenizer": tok,
                                "acoustic_tokenizer": {"path": "/a", "fingerprint": "sha256:cccc"}})
  fingerprint.check_compatible({"stage1": {"path": "/released.safetensors", "trained_on": {}},
                                "ssl_tokenizer": other})  # nothing recorded: nothing to check
  with pytest.raises(fingerprint.IncompatiblePartsError) as e:
    fingerprint.check_compatible({"stage1": stage1, "ssl_tokenizer": other})
  msg = str(e.value)
  assert msg.startswith("error: the ssl_tokenizer /t2") and "the stage1 /w" in msg and "\n" not in msg
  with pytest.raises(fingerprint.IncompatiblePartsError, match="s2a_full /s2a2 was trained on ssl_tokenizer"):
    fingerprint.check_compatible({"stage1": stage1,
                                  "s2a_full": {"path": "/s2a2", "trained_on": {"ssl_tokenizer": "sha256:bbbb"}}})


def test_stft_and_istft_invert_each_other():
  x = np.random.default_rng(1).normal(size=(2, 20 * 480)).astype(np.float32)
  y = np.asarray(mel_renderer.istft(mel_renderer.stft(x, 20)))
  # The window overlap covers every sample (Hann 960 over a 480 hop), so the inverse is exact.
  np.testing.assert_allclose(y, x, atol=2e-4)


@pytest.mark.slow
def test_mel_renderer_follows_the_input_clip(tmp_path):
  from scipy.signal import resample_poly
  import soundfile
  corpus = str(tmp_path / "corpus")
  demo_corpus.generate(corpus, languages=("en",), speakers_per_language=2, sentences_per_speaker=3)
  waves = []
  for dirpath, _, files in sorted(os.walk(corpus)):
    for name in sorted(f for f in files if f.endswith(".wav")):
      x, rate = soundfile.read(os.path.join(dirpath, name), dtype="float32")
      waves.append(resample_poly(x, 160, 147).astype(np.float32))  # 22050 -> 24000 Hz
  feats = np.concatenate([np.asarray(acoustic_kmeans.log_mel(w[None, :len(w) // 480 * 480]))[0] for w in waves])
  tok = acoustic_kmeans.fit(feats, num_quantizers=4, codebook_size=64, iterations=8)
  renderer = mel_renderer.MelRenderer(tok, iterations=32)
  clip, other = waves[0], waves[1]
  n = min(len(clip), len(other)) // 480 * 480
  clip, other = clip[:n], other[:n]
  codes = renderer.encode(clip[None])
  assert codes.shape == (1, n // 480, 4)
  out = np.asarray(renderer.decode(codes))[0]
  assert out.shape == (n,) and np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, np.asarray(renderer.decode(codes))[0])  # deterministic
  # Frame-energy contour from the input samples themselves (not through the tokenizer).
  energy = 10 * np.log10(np.maximum(np.mean(clip.reshape(-1, 480).astype(np.float64) ** 2, 1), 1e-10))
  got = 10 * np.log10(np.maximum(np.mean(out.reshape(-1, 480).astype(np.float64) ** 2, 1), 1e-10))
  assert np.corrcoef(energy, got)[0, 1] > 0.8
  assert evaluation.mel_distance(out, clip) < 0.5 * evaluation.mel_distance(other, clip)
  # Frame lengths: silence past them.
  short = np.asarray(renderer.decode(codes, np.array([10])))[0]
  assert np.all(short[10 * 480:] == 0) and np.any(short[:10 * 480] != 0)


def _small_data_cfg():
  from metis_jax import config_base
  cfg = config_base.get_config().data
  with cfg.unlocked():
    cfg.kmeans_clusters = 32
    cfg.kmeans_iterations = 3
    cfg.kmeans_max_frames = 4000
  return cfg


@pytest.mark.slow
def test_demo_data_builds_identically_twice_and_refuses_another_recipe(tmp_path):
  cfg = _small_data_cfg()
  prints = []
  for name in ("one", "two"):
    directory = str(tmp_path / name)
    shards = demo.prepare(directory, cfg, log=lambda s: None)
    prints.append(demo.fingerprints(directory))
    lineage = fingerprint.read_lineage(shards)
    assert lineage["ssl_tokenizer"]["fingerprint"] == prints[-1]["ssl_tokenizer"]
  assert prints[0] == prints[1] and set(prints[0]) == {"corpus", "ssl_tokenizer", "shards"}
  assert prints[0]["ssl_tokenizer"] == fingerprint.fingerprint(demo.tokenizer_dir(str(tmp_path / "one")))
  with cfg.unlocked():
    cfg.kmeans_clusters = 16
  with pytest.raises(ValueError, match=r"^error: .* built with other settings \(kmeans"):
    demo.prepare(str(tmp_path / "one"), cfg, log=lambda s: None)


def test_bundle_check_refuses_a_model_trained_on_another_tokenizer(tmp_path):
  root = tmp_path / "job"
  rng = np.random.default_rng(2)
  ssl = _kmeans_tokenizer(root / "demo_data", "tokenizer", rng.normal(size=(8, 160)).astype(np.float32))
  acoustic = str(root / "demo_data" / "acoustic")
  acoustic_kmeans.ResidualKMeansAcousticTokenizer(rng.normal(size=(2, 4, 80)), np.zeros(80), np.ones(80)).save(acoustic)
  good = {"ssl_tokenizer": fingerprint.lineage_entry(ssl), "acoustic_tokenizer": fingerprint.lineage_entry(acoustic)}
  fingerprint.write_lineage(str(root), {"ssl_tokenizer": good["ssl_tokenizer"]})
  for name in ("s2a_1layer", "s2a_full"):
    fingerprint.write_lineage(str(root / name), good)
  with open(root / demo_bundle.BUNDLE_NAME, "w") as f:
    json.dump({"version": 1, "parts": {"stage1": ".", "s2a_1layer": "s2a_1layer", "s2a_full": "s2a_full",
                                       "ssl_tokenizer": "demo_data/tokenizer",
                                       "acoustic_tokenizer": "demo_data/acoustic"}}, f)
  assert demo_bundle.is_bundle(str(root))
  bundle = demo_bundle.read_bundle(str(root))
  assert demo_bundle.check_bundle(bundle)["ssl_tokenizer"] == good["ssl_tokenizer"]["fingerprint"]
  # The full S2A retrained on another acoustic tokenizer: refused, naming it.
  fingerprint.write_lineage(str(root / "s2a_full"), dict(good, acoustic_tokenizer={"fingerprint": "sha256:0", "path": "x"}))
  with pytest.raises(fingerprint.IncompatiblePartsError, match="does not belong to the s2a_full"):
    demo_bundle.check_bundle(demo_bundle.read_bundle(str(root)))
