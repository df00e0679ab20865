"""Fine-tuning task data made on the fly (metis_jax.data.tasks, noise, perturb, condition_features)."""

import json
import math
import os

import numpy as np
import pytest
import soundfile

from metis_jax.data import condition_features as cf
from metis_jax.data import noise as noise_lib
from metis_jax.data import perturb
from metis_jax.data import records
from metis_jax.data import shards
from metis_jax.data import tasks
from metis_jax.data import tokenizer as tk

SR = 16000
SPEAKERS = {"spk_a": 110.0, "spk_b": 160.0, "spk_c": 220.0}
PER_SPEAKER = 3


def harmonic(f0: float, seconds: float, seed: int = 0) -> np.ndarray:
  """A voiced-like test signal: 15 harmonics of f0 with a slow amplitude envelope, peak ~0.5."""
  t = np.arange(int(seconds * SR)) / SR
  x = sum(np.sin(2 * np.pi * f0 * k * t + k * 0.3 * seed) / k for k in range(1, 16))
  x *= 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t + seed)
  return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def acf_f0(x: np.ndarray, lo: float = 60.0, hi: float = 500.0) -> float:
  """f0 of a periodic signal from the highest autocorrelation peak between 1/hi and 1/lo seconds."""
  x = np.asarray(x, np.float64)[2000:-2000]
  x = x - x.mean()
  c = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * len(x))) ** 2)[:len(x)]  # Autocorrelation at lags 0..n-1.
  a, b = int(SR / hi), int(SR / lo)
  return SR / (a + int(np.argmax(c[a:b])))


def utterance(uid: str, speaker: str, seconds: float, fill: int, seed: int = 0, phones=None,
              visual: bool = False) -> tasks.Utterance:
  wav = harmonic(SPEAKERS.get(speaker, 130.0), seconds, seed)
  n_tok = tk.num_ssl_frames(len(wav))
  vis = None
  if visual:
    vis = np.random.default_rng(seed).standard_normal(((n_tok + 1) // 2, cf.VISUAL_DIM)).astype(np.float32)
  return tasks.Utterance(uid, speaker, np.full((n_tok,), fill, np.int32), wav,
                         None if phones is None else np.asarray(phones, np.int32), vis)


def write_corpus(root: str, bad: bool = False) -> tuple[str, list[str]]:
  """A tiny tokenized corpus: 3 speakers x 3 utterances; record i's tokens all equal i.

  With `bad`: one record whose audio file is garbage and one too short.
  Returns (shard folder, record ids in shard order).
  """
  corpus = os.path.join(root, "corpus")
  recs, ids = [], []
  items = [(spk, j) for spk in SPEAKERS for j in range(PER_SPEAKER)]
  if bad:
    items += [("spk_a", "corrupt"), ("spk_b", "short")]
  for i, (spk, j) in enumerate(items):
    rel = f"{spk}/{spk}_{j}.wav"
    path = os.path.join(corpus, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    seconds = 0.2 if j == "short" else 1.0 + 0.25 * (i % 3)
    wav = harmonic(SPEAKERS[spk], seconds, seed=i)
    if j == "corrupt":
      with open(path, "wb") as f:
        f.write(b"RIFF this is not audio")
    else:
      soundfile.write(path, wav, SR, subtype="FLOAT")
      np.save(path[:-4] + ".npy", cf.synthetic_visual_features(wav))
    n_tok = tk.num_ssl_frames(len(wav))
    rid = f"{spk}/{spk}_{j}"
    recs.append(records.encode(rid, np.full((n_tok,), i, np.int32), speaker=spk, duration=seconds,
                               phones=np.arange(5 + i % 4) + 10 * i, source=rel))
    ids.append(rid)
  out = os.path.join(root, "shards")
  os.makedirs(out)
  shards.write_shard(os.path.join(out, shards.shard_name(0, 1)), recs)
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump({"input": corpus}, f)
  return out, ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("task_corpus")))


@pytest.fixture(scope="module")
def noise_dirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("task_noise"))
  made = noise_lib.make_demo_noise(root, seconds=2.0)
  assert len(made["noise"]) == 5 and len(made["rir"]) == 4
  return os.path.join(root, "noise"), os.path.join(root, "rir")


OPTS = tasks.TaskOptions(max_length=200, min_tokens=20, prompt_tokens=(20, 60), reverb_prob=0.5)


# ---------------------------------------------------------------------------
# Builders on tiny inputs.


def test_se_builder_snr_within_range_and_aligned(noise_dirs):
  bank = noise_lib.NoiseBank([noise_dirs[0]], [noise_dirs[1]])
  target = utterance("t", "spk_a", 1.3, 7)
  reverbs = set()
  for seed in range(12):
    out = tasks.build_se(target, np.random.default_rng(seed), OPTS, bank)
    parts = out["parts"]
    lo, hi = OPTS.snr_db
    measured = noise_lib.snr_db(parts["speech"], parts["noise"])
    assert lo - 1e-3 <= measured <= hi + 1e-3
    assert measured == pytest.approx(parts["snr_db"], abs=1e-3)
    np.testing.assert_allclose(out["cond_audio"], parts["speech"] + parts["noise"], atol=1e-6)
    assert out["prompt_length"] == 0
    np.testing.assert_array_equal(out["tokens"], target.tokens)
    assert tk.num_ssl_frames(len(out["cond_audio"])) == len(out["tokens"])
    assert np.max(np.abs(out["cond_audio"])) <= 0.99 + 1e-6
    reverbs.add(parts["reverb"])
  assert reverbs == {True, False}


def test_tse_builder_sir_prompt_and_frames():
  target = utterance("t", "spk_a", 1.2, 1, seed=1)
  prompt = utterance("p", "spk_a", 1.5, 2, seed=2)
  other = utterance("o", "spk_b", 0.8, 3, seed=3)  # Shorter than the target: tiled.
  for seed in range(8):
    out = tasks.build_tse(target, prompt, other, np.random.default_rng(seed), OPTS)
    parts = out["parts"]
    measured = noise_lib.snr_db(parts["speech"], parts["interference"])
    assert OPTS.sir_db[0] - 1e-3 <= measured <= OPTS.sir_db[1] + 1e-3
    assert measured == pytest.approx(parts["sir_db"], abs=1e-3)
    p = out["prompt_length"]
    assert OPTS.prompt_tokens[0] <= p <= OPTS.prompt_tokens[1]
    assert (out["tokens"][:p] == 2).all() and (out["tokens"][p:] == 1).all()
    assert len(out["tokens"]) == p + len(target.tokens)
    # [prompt; mixture] as one waveform has exactly P + T frames.
    assert len(out["cond_audio"]) == 320 * p + len(target.wav)
    assert tk.num_ssl_frames(len(out["cond_audio"])) == len(out["tokens"])
    np.testing.assert_allclose(out["cond_audio"][320 * p:], parts["speech"] + parts["interference"], atol=1e-6)
  with pytest.raises(tasks.ExampleError):
    tasks.build_tse(target, prompt, utterance("o2", "spk_a", 1.0, 4), np.random.default_rng(0), OPTS)


def test_vc_perturbation_shifts_pitch_and_keeps_length():
  wav = harmonic(140.0, 1.0)
  f0 = acf_f0(wav)
  assert f0 == pytest.approx(140.0, rel=0.02)
  for seed in range(4):
    out, draws = perturb.perturb_timbre(wav, np.random.default_rng(seed))
    assert out.shape == wav.shape and out.dtype == np.float32
    assert 2.0 <= abs(draws["semitones"]) <= 5.0
    expected = 140.0 * 2.0 ** (draws["semitones"] / 12.0)
    assert acf_f0(out) == pytest.approx(expected, rel=0.03)
    assert abs(acf_f0(out) - f0) / f0 > 0.1
  # The builder: condition = [prompt; perturbed source], the target tokens unchanged.
  target, prompt = utterance("t", "spk_c", 1.0, 5), utterance("p", "spk_c", 1.2, 6, seed=1)
  out = tasks.build_vc(target, prompt, np.random.default_rng(3), OPTS)
  p = out["prompt_length"]
  assert len(out["parts"]["source"]) == len(target.wav)
  np.testing.assert_array_equal(out["cond_audio"][320 * p:], out["parts"]["source"])
  assert tk.num_ssl_frames(len(out["cond_audio"])) == len(out["tokens"]) == p + len(target.tokens)


def test_formant_warp_keeps_pitch():
  wav = harmonic(150.0, 1.0)
  warped = perturb.warp_formants(wav, 1.2)
  assert warped.shape == wav.shape
  assert acf_f0(warped) == pytest.approx(150.0, rel=0.03)
  # The spectral centroid moves up with the envelope.
  centroid = lambda x: np.sum(np.abs(np.fft.rfft(x)) * np.arange(len(x) // 2 + 1)) / np.sum(np.abs(np.fft.rfft(x)))
  assert centroid(warped) > 1.05 * centroid(wav)


def test_tts_builder_phones_and_tokens():
  target = utterance("t", "spk_a", 1.0, 1, phones=[3, 4, 5])
  prompt = utterance("p", "spk_a", 1.0, 2, phones=[7, 8])
  out = tasks.build_tts(target, prompt, np.random.default_rng(0), OPTS)
  np.testing.assert_array_equal(out["phones"], [7, 8, 3, 4, 5])
  assert out["prompt_length"] == len(prompt.tokens)
  assert len(out["tokens"]) == len(prompt.tokens) + len(target.tokens)
  assert len(out["cond_audio"]) == 0
  with pytest.raises(tasks.ExampleError, match="no phones"):
    tasks.build_tts(utterance("x", "spk_a", 1.0, 1), prompt, np.random.default_rng(0), OPTS)


def test_interpolate_x2_matches_formula():
  v = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
  out = cf.interpolate_x2(v)
  assert out.shape == (14, 5)
  t = len(v)
  for k in range(t):
    np.testing.assert_allclose(out[2 * k], 0.75 * v[k] + 0.25 * v[max(k - 1, 0)], rtol=1e-6)
    np.testing.assert_allclose(out[2 * k + 1], 0.75 * v[k] + 0.25 * v[min(k + 1, t - 1)], rtol=1e-6)
  np.testing.assert_allclose(cf.interpolate_x2(v[:1]), np.repeat(v[:1], 2, axis=0))


def test_l2s_builder_zero_prompt_frames():
  target = utterance("t", "spk_a", 1.0, 1, visual=True)
  prompt = utterance("p", "spk_a", 1.2, 2, seed=1)
  out = tasks.build_l2s(target, prompt, np.random.default_rng(0), OPTS)
  p = out["prompt_length"]
  vis = out["visual"]
  assert vis.shape == (len(out["tokens"]), cf.VISUAL_DIM)
  assert not vis[:p].any()
  length = min(len(target.tokens), 2 * len(target.visual))
  np.testing.assert_allclose(vis[p:], cf.interpolate_x2(target.visual)[:length])
  assert len(out["tokens"]) == p + length


def test_cheap_features_match_the_tokenizer_features():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  wav = np.zeros((2, 12000), np.float32)
  wav[0] = harmonic(120.0, 0.75)
  wav[1, :9000] = harmonic(200.0, 9000 / SR, seed=2)
  # A noise floor: in empty bands float32 FFTs (JAX) and float64 ones (numpy) disagree on log(~0).
  wav += 0.003 * np.random.default_rng(0).standard_normal(wav.shape).astype(np.float32)
  wav[1, 9000:] = 0.0
  lengths = np.array([12000, 9000])
  got, got_len = cf.cheap_condition_features(wav, lengths)
  want, want_len = tk.log_mel_features(jnp.asarray(wav), jnp.asarray(lengths))
  assert got.shape == (2, tk.num_ssl_frames(12000), 160)
  np.testing.assert_array_equal(got_len, np.asarray(want_len))
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-3)


def test_synthetic_rir_decays_at_rt60():
  rir = noise_lib.synthetic_rir(0.4, np.random.default_rng(0), seconds=0.8)
  assert rir[0] == 1.0
  tail = rir[int(0.01 * SR):].astype(np.float64) ** 2
  early = tail[:int(0.05 * SR)].mean()
  late = tail[int(0.39 * SR):int(0.44 * SR)].mean()
  # 60 dB of amplitude over rt60 is 60 dB of energy; the windows are 0.39 s apart: about -58 dB.
  assert -64 < 10 * math.log10(late / early) < -52


# ---------------------------------------------------------------------------
# The Grain pipeline on a tiny corpus.


def _make(task, shard_dir, noise_dirs=None, seed=0, batch_size=3, **opts):
  o = dict(max_length=200, min_tokens=20, prompt_tokens=(20, 60))
  o.update(opts)
  nd, rd = noise_dirs or ("", "")
  return tasks.make_task_iterator(task, shard_dir, tasks.TaskOptions(**o), batch_size=batch_size, seed=seed,
                                  noise_dirs=[nd] if nd else (), rir_dirs=[rd] if rd else ())


def test_prompt_is_another_utterance_of_the_same_speaker(corpus):
  shard_dir, ids = corpus
  speaker_of = {i: rid.split("/")[0] for i, rid in enumerate(ids)}
  for task in ("tse", "vc", "l2s", "tts"):
    it = _make(task, shard_dir)
    for _ in range(6):
      b = next(it)
      for r in range(b["tokens"].shape[0]):
        p, n = b["prompt_lengths"][r], b["valid"][r].sum()
        prompt, target = set(b["tokens"][r, :p]), set(b["tokens"][r, p:n])
        assert len(prompt) == 1 and len(target) == 1, (task, prompt, target)
        (pi,), (ti,) = prompt, target
        assert pi != ti and speaker_of[pi] == speaker_of[ti]
    assert it.get_state()["skipped"] == 0


def test_batch_shapes_and_frames(corpus, noise_dirs):
  shard_dir, _ = corpus
  for task in ("se", "tse", "vc"):
    b = next(_make(task, shard_dir, noise_dirs))
    t = b["tokens"].shape[1]
    assert t in (50, 100, 150, 200)
    assert b["cond_audio"].shape == (3, 320 * t + 80) and b["cond_audio"].dtype == np.float32
    assert tk.num_ssl_frames(b["cond_audio"].shape[1]) == t
    np.testing.assert_array_equal(tk.num_ssl_frames(b["cond_audio_lengths"]), b["valid"].sum(1))
  b = next(_make("se", shard_dir, noise_dirs, features="cheap"))
  assert b["cond_features"].shape == b["tokens"].shape + (160,)
  np.testing.assert_array_equal(b["cond_lengths"], b["valid"].sum(1))
  b = next(_make("tts", shard_dir))
  assert b["phones"].shape == (3, 64) and b["phones"].dtype == np.int32
  assert (b["phones"][~b["phone_valid"]] == 1023).all()
  b = next(_make("l2s", shard_dir))
  assert b["visual"].shape == b["tokens"].shape + (768,)


def test_deterministic_per_seed_and_exact_resume(corpus, noise_dirs):
  shard_dir, _ = corpus
  first = [next(it) for it in [_make("se", shard_dir, noise_dirs, seed=5)] for _ in range(3)]
  again = _make("se", shard_dir, noise_dirs, seed=5)
  for want in first:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = next(_make("se", shard_dir, noise_dirs, seed=6))
  assert not np.array_equal(other["cond_audio"], first[0]["cond_audio"])
  it = _make("vc", shard_dir, seed=2)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  resumed = _make("vc", shard_dir, seed=2)
  resumed.set_state(json.loads(json.dumps(state)))
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_bad_and_short_audio_skipped_and_counted(tmp_path):
  shard_dir, _ = write_corpus(str(tmp_path), bad=True)
  it = _make("vc", shard_dir, batch_size=4)
  batches = [next(it) for _ in range(6)]  # Two full passes over 11 targets: each bad one met twice.
  assert all(b["tokens"].shape[0] == 4 for b in batches)
  state = it.get_state()
  assert state["skipped"] >= 2
  reasons = state["skipped_by_reason"]
  assert reasons.get("vc: too short", 0) >= 1, reasons
  assert reasons.get("vc: cannot decode", 0) >= 1, reasons
  assert sum(reasons.values()) == state["skipped"]


def test_omni_mixture_proportions(corpus, noise_dirs):
  shard_dir, _ = corpus
  weights = (0.5, 0.25, 0.125, 0.125)
  it = _make("omni", shard_dir, noise_dirs, batch_size=8, omni_tasks=("se", "tse", "vc", "tts"),
             omni_weights=weights)
  counts = np.zeros(len(tasks.TASKS))
  for _ in range(8):
    b = next(it)
    np.add.at(counts, b["task"], 1)
    assert set(b) >= {"cond_audio", "phones", "prompt_lengths"}
    tts = b["task"] == tasks.TASKS.index("tts")
    assert (b["cond_audio_lengths"][tts] == 0).all() and (b["phone_valid"][~tts] == 0).all()
  frac = counts[:4] / counts.sum()
  np.testing.assert_allclose(frac, weights, atol=0.06)


def test_task_options_errors():
  with pytest.raises(ValueError, match="error: unknown task options"):
    tasks.TaskOptions.from_config({"snr": (0, 1)})
  with pytest.raises(ValueError, match="error: task option snr_db"):
    tasks.TaskOptions(snr_db=(10, 0))
  assert tasks.TaskOptions.from_config({"snr_db": [0, 5]}).snr_db == (0, 5)


def test_records_without_sources_are_refused(tmp_path):
  out = tmp_path / "shards"
  out.mkdir()
  shards.write_shard(str(out / shards.shard_name(0, 1)), [records.encode("a", np.zeros(60, np.int32), speaker="s")])
  with pytest.raises(ValueError, match="--record_sources"):
    _make("vc", str(out))


def test_tokenize_job_records_sources(tmp_path):
  from metis_jax import config_base  # pylint: disable=g-import-not-at-top
  from metis_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / "c" / "spk"
  corpus.mkdir(parents=True)
  for i in range(2):
    soundfile.write(str(corpus / f"u{i}.wav"), harmonic(150.0, 1.2, seed=i), SR)
  cfg = config_base.data_config()
  tokenizer = tk.KMeansTokenizer(np.random.default_rng(0).standard_normal((8, 160)).astype(np.float32))
  phonemizer = lambda text, lang: None  # No phones: records are kept, without 'p'.
  tokenize.run(cfg, str(tmp_path / "c"), str(tmp_path / "out"), tokenizer=tokenizer, phonemizer=phonemizer,
               record_sources=True, process_index=0, process_count=1, log=lambda s: None)
  recs = [records.decode(r) for r in shards.read_all(shards.list_shards(str(tmp_path / "out")))]
  assert sorted(r["source"] for r in recs) == ["spk/u0.wav", "spk/u1.wav"]
  assert all("phones" not in r for r in recs)
