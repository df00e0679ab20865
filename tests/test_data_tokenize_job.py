"""The tokenization job: shards, manifest, resume, process slicing, bad input."""

import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile

from metis_jax import config_base
from metis_jax.data import audio
from metis_jax.data import demo_corpus
from metis_jax.data import fit_kmeans
from metis_jax.data import manifest as manifest_lib
from metis_jax.data import records
from metis_jax.data import shards
from metis_jax.data import tokenize
from metis_jax.data import tokenizer as tk
from metis_jax.frontend import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda s: None  # noqa: E731


def _cfg(**overrides):
  cfg = config_base.data_config()
  cfg.files_per_shard = 5
  cfg.tokenize_batch_seconds = 40.0
  cfg.kmeans_clusters = 16
  cfg.kmeans_iterations = 4
  cfg.decode_threads = 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("demo"))
  info = demo_corpus.generate(root, languages=("en", "de"), speakers_per_language=2, sentences_per_speaker=4)
  assert info["files"] == 16 and 30 < info["seconds"] < 120
  return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("kmeans"))
  tok = fit_kmeans.fit_tokenizer(_cfg(), corpus, out, log=QUIET)
  assert tok.vocab_size == 16
  return tk.load_tokenizer(out)


@pytest.fixture(scope="module")
def reference_run(corpus, tokenizer, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tokens"))
  result = tokenize.run(_cfg(), corpus, out, tokenizer=tokenizer, log=QUIET)
  return out, result


def _records(out):
  return [records.decode(r) for r in shards.read_all(shards.list_shards(out))]


def test_job_writes_shards_and_manifest(corpus, reference_run):
  out, result = reference_run
  names = [shards.shard_name(i, 4) for i in range(4)]
  assert result.shards_written == names and result.shards_skipped == []
  assert sorted(os.listdir(out)) == sorted(names + [n.replace(".array_record", ".stats.json") for n in names]
                                           + ["job.json", "manifest.json"])
  assert all(shards.check_group_size_one(os.path.join(out, n)) for n in names)
  recs = _records(out)
  assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
  for r in recs:
    stem = os.path.join(corpus, r["id"])
    with open(stem + ".txt", encoding="utf-8") as f:
      assert r["text"] == f.read().strip()
    assert r["language"] == r["id"][:2] and r["speaker"] == r["id"].split("/")[1]
    samples = soundfile.info(stem + ".wav").frames
    assert len(r["ssl_tokens"]) == tk.num_ssl_frames(math.ceil(samples * 16000 / 22050))
    assert r["ssl_tokens"].max() < 16 and r["duration"] == pytest.approx(samples / 22050)
  m = manifest_lib.load(out)
  assert m["complete"] and m["utterances"] == 16 and m["skipped_count"] == 0
  assert set(m["hours_per_language"]) == {"en", "de"}
  assert m["hours"] == pytest.approx(sum(r["duration"] for r in recs) / 3600)
  assert m["tokens"] == sum(len(r["ssl_tokens"]) for r in recs)
  assert m["tokenizer"]["vocab_size"] == 16 and m["frame_rate"] == 50


def test_rerun_after_kill_finishes_without_duplicates(corpus, tokenizer, reference_run, tmp_path):
  out = str(tmp_path / "tokens")
  cfg = _cfg()
  tokenize.run(cfg, corpus, out, tokenizer=tokenizer, log=QUIET)
  first = {r["id"]: r for r in _records(out)}
  # Simulate a kill: shard 1 gone, shard 2 has stats but no shard, shard 3
  # was being written (a tmp file left behind), and no manifest yet.
  name = lambda i: os.path.join(out, shards.shard_name(i, 4))  # noqa: E731
  os.remove(name(1))
  os.remove(manifest_lib.stats_path(name(1)))
  os.remove(name(2))
  os.rename(name(3), name(3) + ".tmp")
  os.remove(os.path.join(out, "manifest.json"))
  result = tokenize.run(cfg, corpus, out, tokenizer=tokenizer, log=QUIET)
  assert result.shards_skipped == [shards.shard_name(0, 4)]
  assert result.shards_written == [shards.shard_name(i, 4) for i in (1, 2, 3)]
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  recs = _records(out)
  assert len(recs) == 16 and {r["id"] for r in recs} == set(first)
  for r in recs:
    np.testing.assert_array_equal(r["ssl_tokens"], first[r["id"]]["ssl_tokens"])
  assert manifest_lib.load(out)["utterances"] == 16
  # A third run has nothing to do.
  again = tokenize.run(cfg, corpus, out, tokenizer=tokenizer, log=QUIET)
  assert again.shards_written == [] and len(again.shards_skipped) == 4
  # A different plan into the same output is refused.
  with pytest.raises(ValueError, match="different job"):
    tokenize.run(_cfg(files_per_shard=3), corpus, out, tokenizer=tokenizer, log=QUIET)


def test_processes_take_disjoint_parts(corpus, tokenizer, reference_run, tmp_path):
  out = str(tmp_path / "tokens")
  r0 = tokenize.run(_cfg(), corpus, out, tokenizer=tokenizer, process_index=0, process_count=2, log=QUIET)
  assert r0.shards_written == [shards.shard_name(i, 4) for i in (0, 2)]
  assert r0.manifest is None and not os.path.exists(os.path.join(out, "manifest.json"))
  r1 = tokenize.run(_cfg(), corpus, out, tokenizer=tokenizer, process_index=1, process_count=2, log=QUIET)
  assert r1.shards_written == [shards.shard_name(i, 4) for i in (1, 3)]
  assert r1.manifest is not None and r1.manifest["complete"]
  ref = {r["id"]: r for r in _records(reference_run[0])}
  got = _records(out)
  assert sorted(r["id"] for r in got) == sorted(ref)
  for r in got:
    np.testing.assert_array_equal(r["ssl_tokens"], ref[r["id"]]["ssl_tokens"])


def _wav(path, x, rate=16000, subtype=None):
  soundfile.write(str(path), x, rate, subtype=subtype)


def _speech(seconds, rate=16000, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  return (0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(5 * t)) * t) + 0.01 * rng.standard_normal(len(t))).astype(
      np.float32)


def _bytes(x, rate, fmt):
  buf = io.BytesIO()
  soundfile.write(buf, x, rate, format=fmt)
  return buf.getvalue()


def _tar_add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_bad_inputs_are_skipped_and_counted(tokenizer, tmp_path):
  src = tmp_path / "bad"
  src.mkdir()
  _wav(src / "good1.wav", _speech(1.5, seed=1))
  (src / "good1.txt").write_text("first good one")
  _wav(src / "good2.flac", _speech(2.0, seed=2))
  (src / "good2.txt").write_text("second good one")
  (src / "truncated.wav").write_bytes(_bytes(_speech(1.5), 16000, "WAV")[:30])
  (src / "corrupt.flac").write_bytes(b"fLaC" + np.random.default_rng(0).bytes(2000))
  _wav(src / "empty.wav", np.zeros(0, np.float32))
  _wav(src / "nan.wav", np.where(np.arange(24000) == 100, np.nan, _speech(1.5)).astype(np.float32), subtype="FLOAT")
  _wav(src / "inf.wav", np.where(np.arange(24000) == 5, np.inf, _speech(1.5)).astype(np.float32), subtype="FLOAT")
  _wav(src / "silence.wav", np.zeros(32000, np.float32))
  (src / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 100)
  _wav(src / "toolong.wav", _speech(31.0, seed=3))
  _wav(src / "tooshort.wav", _speech(0.3))
  _wav(src / "absurd.wav", _speech(1.5))
  (src / "absurd.json").write_text(json.dumps({"duration": -4.0}))
  _wav(src / "badtext.wav", _speech(1.5))
  (src / "badtext.txt").write_bytes(b"caf\xe9 \xff\xfe")
  out = str(tmp_path / "out")
  result = tokenize.run(_cfg(files_per_shard=4), str(src), out, tokenizer=tokenizer, log=QUIET)
  m = result.manifest
  assert m["complete"] and m["utterances"] == 2
  assert sorted(r["id"] for r in _records(out)) == ["good1", "good2"]
  got = {s["file"]: manifest_lib.categorize(s["reason"]) for s in m["skipped"]}
  assert got == {"truncated.wav": "cannot decode", "corrupt.flac": "cannot decode", "empty.wav": "empty audio",
                 "nan.wav": "non-finite samples", "inf.wav": "non-finite samples", "silence.wav": "silent",
                 "song.m4a": "unsupported format", "toolong.wav": "duration", "tooshort.wav": "duration",
                 "absurd.wav": "absurd duration", "badtext.wav": "not valid UTF-8"}
  assert m["skipped_count"] == 11 and sum(m["skipped_by_reason"].values()) == 11
  assert all(s["reason"] for s in m["skipped"])

  # Emilia tars: a member without its json, and a truncated tar whose
  # complete members before the cut are kept.
  tars = tmp_path / "emilia"
  tars.mkdir()
  with tarfile.open(tars / "A.tar", "w") as tar:
    for i in range(2):
      _tar_add(tar, f"A_{i}.mp3", _bytes(_speech(1.5, 24000, seed=i), 24000, "MP3"))
      _tar_add(tar, f"A_{i}.json", json.dumps({"id": f"A_{i}", "text": f"a {i}", "duration": 1.5, "speaker": "s",
                                               "language": "zh", "dnsmos": 3.4}).encode())
    _tar_add(tar, "A_nojson.mp3", _bytes(_speech(1.5, 24000), 24000, "MP3"))
    _tar_add(tar, "A_big.json", json.dumps({"id": "A_big", "text": "x", "duration": 1e12}).encode())
    _tar_add(tar, "A_big.mp3", _bytes(_speech(1.5, 24000), 24000, "MP3"))
  full = io.BytesIO()
  with tarfile.open(fileobj=full, mode="w") as tar:
    for i in range(3):
      _tar_add(tar, f"B_{i}.json", json.dumps({"id": f"B_{i}", "text": f"b {i}", "language": "en"}).encode())
      _tar_add(tar, f"B_{i}.mp3", _bytes(_speech(1.5, 24000, seed=10 + i), 24000, "MP3"))
  data = full.getvalue()
  (tars / "B.tar").write_bytes(data[:int(len(data) * 0.8)])  # Cut inside B_2's audio.
  out = str(tmp_path / "out_emilia")
  m = tokenize.run(_cfg(), str(tars), out, tokenizer=tokenizer, log=QUIET).manifest
  assert sorted(r["id"] for r in _records(out)) == ["A_0", "A_1", "B_0", "B_1"]
  got = {s["file"]: manifest_lib.categorize(s["reason"]) for s in m["skipped"]}
  assert got == {"A.tar:A_nojson.mp3": "without its json", "A.tar:A_big.mp3": "duration", "B.tar": "unreadable tar"}
  assert m["hours_per_language"].keys() == {"zh", "en"}


def test_real_speech_folder(speech_dir, tokenizer, tmp_path):
  out = str(tmp_path / "speech_tokens")
  m = tokenize.run(_cfg(files_per_shard=4), speech_dir, out, tokenizer=tokenizer, log=QUIET).manifest
  wavs = sorted(f for f in os.listdir(speech_dir) if f.endswith(".wav"))
  assert m["utterances"] == len(wavs) >= 5 and m["skipped_count"] == 0
  recs = {r["id"]: r for r in _records(out)}
  for f in wavs:
    rec = recs[f[:-4]]
    info = soundfile.info(os.path.join(speech_dir, f))
    assert len(rec["ssl_tokens"]) == tk.num_ssl_frames(math.ceil(info.frames * 16000 / info.samplerate))
    assert rec["duration"] == pytest.approx(info.duration)
    txt = os.path.join(speech_dir, f[:-4] + ".txt")
    if os.path.exists(txt):
      with open(txt, encoding="utf-8") as fh:
        assert rec["text"] == fh.read().strip() != ""
  assert not [f for f in os.listdir(speech_dir) if f.endswith((".array_record", ".json", ".tmp"))]


class _FakeCodec:
  """A stand-in acoustic tokenizer: 12 codebooks at 50 Hz from 24 kHz audio."""
  sample_rate, frame_rate, num_quantizers = 24000, 50, 12

  def tokenize(self, waveforms, lengths):
    w = np.asarray(waveforms)
    frames = -(-w.shape[1] // 480)
    lengths = -(-np.asarray(lengths) // 480)
    codes = (np.arange(frames)[None, :, None] * 7 + np.arange(12)[None, None, :]) % 1024
    codes = np.broadcast_to(codes, (w.shape[0], frames, 12))
    return codes.astype(np.int32), lengths.astype(np.int32)


def test_acoustic_tokens_and_phones(corpus, tokenizer, tmp_path):
  assert isinstance(_FakeCodec(), tk.AcousticTokenizer)
  out = str(tmp_path / "ac")
  phonemizer = lambda text, lang: [ord(c) % 300 for c in text]  # noqa: E731
  tokenize.run(_cfg(files_per_shard=16), corpus, out, tokenizer=tokenizer, acoustic_tokenizer=_FakeCodec(),
               phonemizer=phonemizer, log=QUIET)
  for r in _records(out):
    samples24 = math.ceil(soundfile.info(os.path.join(corpus, r["id"] + ".wav")).frames * 24000 / 22050)
    assert r["acoustic_tokens"].shape == (-(-samples24 // 480), 12)
    np.testing.assert_array_equal(r["acoustic_tokens"][3], (21 + np.arange(12)) % 1024)
    np.testing.assert_array_equal(r["phones"], [ord(c) % 300 for c in r["text"]])


@pytest.mark.slow
def test_command_line_entry_points(tmp_path):
  corpus = str(tmp_path / "corpus")
  subprocess.run([sys.executable, "-m", "metis_jax.data.demo_corpus", "--output", corpus, "--languages", "fr",
                  "--speakers", "1", "--sentences", "4"], check=True, cwd=REPO, capture_output=True)
  common = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--input", corpus,
            "--config.data.kmeans_clusters=8", "--config.data.kmeans_iterations=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, "-m", "metis_jax.data.fit_kmeans", *common, "--output", str(tmp_path / "tok")],
                 check=True, cwd=REPO, capture_output=True, env=env)
  cache = tmp_path / "xla_cache"
  subprocess.run([sys.executable, "-m", "metis_jax.data.tokenize", *common, "--output", str(tmp_path / "out"),
                  f"--config.data.tokenizer_dir={tmp_path / 'tok'}", f"--compilation_cache_dir={cache}"],
                 check=True, cwd=REPO, capture_output=True, env=dict(env, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
  m = manifest_lib.load(str(tmp_path / "out"))
  assert m["utterances"] == 4 and m["hours_per_language"].keys() == {"fr"} and m["tokenizer"]["vocab_size"] == 8
  assert any(name.startswith("jit_") for name in os.listdir(cache))  # the flag's folder holds its programs


@pytest.mark.slow
def test_job_with_the_real_acoustic_codec_from_released_files(corpus, tokenizer, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from metis_jax.models import acoustic_codec  # pylint: disable=g-import-not-at-top
  from metis_jax.conversion import acoustic_codec as convert  # pylint: disable=g-import-not-at-top
  config = acoustic_codec.AcousticCodecConfig(encoder_dim=4, latent_dim=8, codebook_size=32,
                                              vocos_dim=16, vocos_intermediate_dim=32, vocos_num_layers=1)
  params = acoustic_codec.init_params(acoustic_codec.AcousticCodec(config), jax.random.key(0))
  enc, dec = str(tmp_path / "encoder.safetensors"), str(tmp_path / "decoder.safetensors")
  convert.save_amphion(enc, dec, params, config)
  cfg = _cfg(files_per_shard=16, acoustic_codec_encoder=enc, acoustic_codec_decoder=dec)
  out = str(tmp_path / "ac")
  tokenize.run(cfg, corpus, out, tokenizer=tokenizer,
               acoustic_tokenizer=tokenizers.acoustic_tokenizer_from_config(cfg), log=QUIET)
  codec = acoustic_codec.AcousticCodecInference(config, params)
  rows = _records(out)
  assert rows
  for r in rows[:2]:
    wav, rate = soundfile.read(os.path.join(corpus, r["id"] + ".wav"), dtype="float32")
    wav24 = audio.resample(wav, rate, 24000)
    expected = np.asarray(codec.encode(wav24[None]))[0]
    assert r["acoustic_tokens"].shape == (len(wav24) // 480, 12)
    np.testing.assert_array_equal(r["acoustic_tokens"], expected)
  with pytest.raises(ValueError, match="decoder"):
    tokenizers.acoustic_tokenizer_from_config(_cfg(acoustic_codec_encoder=enc))
