"""End to end: `python -m metis_jax.decode` on tiny random models saved the way a user has them.

The models (a phone-conditioned stage-1 model as a converted folder, the
1-layer S2A as a converted folder, the full S2A as an Amphion safetensors
file, the codec as two safetensors files, a k-means tokenizer) are built once
per module with random weights. The CLI runs in-process (`decode.run_cli`),
so the runs share one engine and its compilations: all padded shapes are kept
in one bucket (`--token_quantum 250`, `--phone_quantum 128`), on one device. The
last two tests decode on 2 devices, and in 2 processes over loopback.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile

from metis_jax.models import acoustic_codec, metis, s2a
from metis_jax import config_lib
from metis_jax.conversion import cli as convert
from metis_jax.inference import cli as decode
from metis_jax.conversion import acoustic_codec as codec_conversion
from metis_jax.conversion import s2a as s2a_conversion
from metis_jax.data import tokenizer as tokenizer_lib
from tests import conftest, helpers
from tests.test_decode_units import random_params_like

pytestmark = pytest.mark.slow

VOCAB = os.path.join(conftest.SHARED, "data", "g2p", "vocab.json")
CLIPS = ("libritts_260_123440_000010_000004", "libritts_5142_33396_000002_000004",
         "libritts_6829_68771_000027_000000")
SSL_VOCAB = 64


def _needs_phonemizer():
  conftest.require_module("phonemizer")


def _s2a_config(num_quantizers, first):
  c = config_lib.load_config("tiny").model
  c.kind, c.vocab_size, c.cond_vocab_size = "s2a", 16, SSL_VOCAB
  c.hidden_size, c.num_heads, c.num_layers, c.dtype = 32, 2, 1, "float32"
  c.num_quantizers, c.predicts_first_layer = num_quantizers, first
  return c


def build_models(root):
  """Writes the five model artifacts under `root`; returns the CLI flags naming them."""
  centroids = np.random.default_rng(0).standard_normal((SSL_VOCAB, 160)).astype(np.float32)
  tokenizer_lib.KMeansTokenizer(centroids).save(os.path.join(root, "tokenizer"))
  cfg = helpers.tiny_model_config(hidden_size=32, num_layers=1, num_heads=2, vocab_size=SSL_VOCAB,
                                  use_phone_cond=True)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  abstract = jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0)))
  convert.save_converted(os.path.join(root, "t2s"), cfg, random_params_like(abstract, 1))
  for name, nq, first in (("s2a_1layer", 1, True), ("s2a_full", 12, False)):
    c = _s2a_config(nq, first)
    m = s2a.S2AModel(s2a.S2AConfig.from_config(c))
    params = random_params_like(jax.eval_shape(lambda m=m: s2a.init_params(m, jax.random.key(0))), nq)
    if first:
      convert.save_converted(os.path.join(root, name), c, params)
    else:
      s2a_conversion.save_amphion(os.path.join(root, name + ".safetensors"), params, c)
  codec_cfg = acoustic_codec.AcousticCodecConfig(
      encoder_dim=4, latent_dim=8, num_quantizers=12, codebook_size=16, vocos_dim=16,
      vocos_intermediate_dim=32, vocos_num_layers=1)
  params = random_params_like(acoustic_codec.abstract_params(acoustic_codec.AcousticCodec(codec_cfg)), 7)
  os.makedirs(os.path.join(root, "codec"))
  codec_conversion.save_amphion(os.path.join(root, "codec", "encoder.safetensors"),
                                os.path.join(root, "codec", "decoder.safetensors"), params, codec_cfg)
  return ["--model", os.path.join(root, "t2s"), "--s2a_full", os.path.join(root, "s2a_full.safetensors"),
          "--s2a_1layer", os.path.join(root, "s2a_1layer"), "--codec", os.path.join(root, "codec"),
          "--tokenizer", os.path.join(root, "tokenizer"), "--vocab", VOCAB,
          # Fast decoding and one padded shape for every run of this module.
          "--steps", "2", "--s2a_steps", "2,1", "--s2a_1layer_steps", "2", "--batch_size", "4",
          "--token_quantum", "250", "--phone_quantum", "128",
          # One device unless a test asks for more (the session has 8 fake ones).
          "--devices_per_process", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  speech = conftest.require_dir(conftest.SPEECH)
  conftest.require_file(VOCAB)
  root = tmp_path_factory.mktemp("decode")
  flags = build_models(str(root / "models"))
  clips = {}
  for name in CLIPS:
    with open(os.path.join(speech, name + ".txt")) as f:
      clips[name] = (os.path.join(speech, name + ".wav"), f.read().strip())
  return {"root": root, "flags": flags, "clips": clips, "speech": speech}


def _run(setup, *argv):
  code = decode.run_cli(["decode"] + setup["flags"] + list(argv))
  return code


def _read_report(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_one_example_has_the_requested_duration_and_a_report(setup):
  _needs_phonemizer()
  wav, text = setup["clips"][CLIPS[0]]
  out = str(setup["root"] / "single" / "out.wav")
  code = _run(setup, "--task", "tts", "--prompt_wav", wav, "--prompt_text", text,
              "--text", "Hello there, how are you today?", "--target_seconds", "1.3", "--out", out)
  assert code == 0
  audio, rate = soundfile.read(out)
  assert rate == 24000 and audio.shape == (int(1.3 * 24000),)
  assert np.abs(audio).max() > 0
  (row,) = _read_report(str(setup["root"] / "single" / "out_report.jsonl"))
  assert row["status"] == "ok" and row["seconds"] == pytest.approx(1.3)
  assert row["target_tokens"] == 65 and row["chunks"] == 1 and row["rtf"] > 0


@pytest.fixture(scope="module")
def manifest_run(setup):
  """Three good examples (one a 44.1 kHz stereo copy of a clip, one with an estimated duration and
  a reference), a corrupt wav, a missing file, an empty text and an unknown language."""
  _needs_phonemizer()
  root = setup["root"] / "manifest"
  root.mkdir()
  (a_wav, a_text), (b_wav, b_text), (c_wav, c_text) = (setup["clips"][n] for n in CLIPS)
  data, rate = soundfile.read(b_wav)
  from metis_jax.data import audio as audio_lib
  stereo = audio_lib.resample(data.astype(np.float32), rate, 44100)
  soundfile.write(root / "stereo.wav", np.stack([stereo, 0.5 * stereo], axis=1), 44100)
  (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 3)
  lines = [
      {"id": "a", "prompt_wav": a_wav, "prompt_text": a_text, "text": "Good morning.", "target_seconds": 1.0},
      {"id": "bad", "prompt_wav": "corrupt.wav", "prompt_text": "x", "text": "Hello."},
      {"id": "b", "prompt_wav": "stereo.wav", "prompt_text": b_text, "text": "Nice to see you.",
       "target_seconds": 2.2},
      {"id": "missing", "prompt_wav": "nope.wav", "prompt_text": "x", "text": "Hello."},
      {"id": "c", "prompt_wav": c_wav, "prompt_text": c_text, "text": "The weather is fine.",
       "reference_wav": a_wav},
      {"id": "empty", "prompt_wav": a_wav, "prompt_text": a_text, "text": "  "},
      {"id": "klingon", "prompt_wav": a_wav, "prompt_text": a_text, "text": "Qapla!", "language": "tlh"},
  ]
  manifest = root / "test.jsonl"
  manifest.write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
  out_dir = root / "out"
  code = _run(setup, "--task", "tts", "--manifest", str(manifest), "--output_dir", str(out_dir))
  report = _read_report(str(out_dir / "report.jsonl"))
  assert [r["index"] for r in report] == list(range(len(lines)))  # in manifest order
  rows = {r["id"]: r for r in report}
  return code, rows, out_dir


def test_manifest_examples_are_generated_with_their_durations(manifest_run):
  code, rows, out_dir = manifest_run
  assert code == 1  # some examples failed
  for ex_id, seconds in (("a", 1.0), ("b", 2.2)):
    audio, rate = soundfile.read(out_dir / f"{ex_id}.wav")
    assert rate == 24000 and len(audio) == int(round(seconds * 50)) * 480
    assert rows[ex_id]["status"] == "ok"
  # "c": estimated from the prompt's phone rate (MaskGCT's rule) and scored against its reference.
  c = rows["c"]
  assert c["status"] == "ok" and c["length_rule"] == "phone_rate"
  assert 0.3 < c["seconds"] < 4.0 and np.isfinite(c["nll"])
  assert len(soundfile.read(out_dir / "c.wav")[0]) == c["target_tokens"] * 480
  summary = json.loads((out_dir / "summary.json").read_text())
  assert summary["ok"] == 3 and summary["failed"] == 4


def test_manifest_failures_are_reported_with_the_reason(manifest_run):
  _, rows, out_dir = manifest_run
  assert rows["bad"]["status"] == "error" and "corrupt.wav" in rows["bad"]["error"]
  assert "cannot decode" in rows["bad"]["error"]
  assert "nope.wav" in rows["missing"]["error"] and "no such file" in rows["missing"]["error"]
  assert "empty text" in rows["empty"]["error"]
  assert "unknown language 'tlh'" in rows["klingon"]["error"]
  assert not any((out_dir / f"{i}.wav").exists() for i in ("bad", "missing", "empty", "klingon"))


def test_an_example_does_not_depend_on_its_batch(setup, manifest_run):
  """Example "a" alone in its batch gives the audio it gave batched with "b" and "c"."""
  _, _, out_dir = manifest_run
  wav, text = setup["clips"][CLIPS[0]]
  root = setup["root"] / "alone"
  root.mkdir()
  line = {"id": "a", "prompt_wav": wav, "prompt_text": text, "text": "Good morning.", "target_seconds": 1.0}
  (root / "m.jsonl").write_text(json.dumps(line) + "\n")
  assert _run(setup, "--task", "tts", "--manifest", str(root / "m.jsonl"), "--output_dir", str(root)) == 0
  np.testing.assert_array_equal(soundfile.read(root / "a.wav")[0], soundfile.read(out_dir / "a.wav")[0])


def test_same_seed_same_audio_other_seed_other_audio(setup):
  _needs_phonemizer()
  wav, text = setup["clips"][CLIPS[1]]
  outs = []
  for i, seed in enumerate((3, 3, 4)):
    out = str(setup["root"] / "seed" / f"{i}.wav")
    assert _run(setup, "--task", "tts", "--prompt_wav", wav, "--prompt_text", text, "--text",
                "Same words again.", "--target_seconds", "1.0", "--seed", str(seed), "--out", out) == 0
    outs.append(soundfile.read(out)[0])
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])


def test_long_text_is_split_generated_in_chunks_and_joined(setup):
  _needs_phonemizer()
  wav, text = setup["clips"][CLIPS[2]]
  long_text = ("The first sentence is here. Then a second one follows it! "
               "Is this the third sentence? Yes, and the fourth closes it.")
  out = str(setup["root"] / "long" / "long.wav")
  hooks = ["--asr_hook", "tests.test_decode_units:fake_asr", "--asr_weights", "asr.bin",
           "--speaker_hook", "tests.test_decode_units:fake_speaker"]
  assert _run(setup, "--task", "tts", "--prompt_wav", wav, "--prompt_text", text, "--text", long_text,
              "--target_seconds", "4.0", "--chunk_seconds", "1.5", "--out", out, *hooks) == 0
  (row,) = _read_report(str(setup["root"] / "long" / "long_report.jsonl"))
  assert row["transcript"] == "loaded asr.bin" and row["wer"] == 1.0
  assert -1 <= row["speaker_similarity"] <= 1
  assert row["chunks"] >= 3 and len(row["chunk_texts"]) == row["chunks"]
  assert " ".join(row["chunk_texts"]) == long_text
  audio, _ = soundfile.read(out)
  assert len(audio) == 4.0 * 24000  # the chunks' tokens add up to the requested duration


def test_continue_and_resynth_tasks(setup):
  wav, _ = setup["clips"][CLIPS[0]]
  out = str(setup["root"] / "cont" / "c.wav")
  assert _run(setup, "--task", "continue", "--prompt_wav", wav, "--target_seconds", "1.5", "--out", out) == 0
  assert len(soundfile.read(out)[0]) == 1.5 * 24000
  out = str(setup["root"] / "resynth" / "r.wav")
  assert _run(setup, "--task", "resynth", "--wav", wav, "--prompt_seconds", "2", "--out", out) == 0
  (row,) = _read_report(str(setup["root"] / "resynth" / "r_report.jsonl"))
  total = soundfile.info(wav).frames / soundfile.info(wav).samplerate
  assert row["status"] == "ok" and abs(row["seconds"] - (total - 2.0)) < 0.1
  assert np.isfinite(row["si_snr"]) and row["mel_distance"] > 0 and np.isfinite(row["nll"])


def test_unusable_runs_exit_with_a_clear_error(setup, capsys):
  wav, text = setup["clips"][CLIPS[0]]
  out = str(setup["root"] / "err" / "x.wav")
  base = ["--prompt_wav", wav, "--prompt_text", text, "--text", "Hi.", "--out", out]
  assert decode.run_cli(["decode", "--task", "vc"] + setup["flags"] + base) == 2
  assert "task 'vc' needs a fine-tuned model with a condition adapter" in capsys.readouterr().err
  flags = [f if f != os.path.join(str(setup["root"] / "models"), "codec") else "/nonexistent/codec"
           for f in setup["flags"]]
  assert decode.run_cli(["decode"] + flags + base) == 2
  assert "/nonexistent/codec" in capsys.readouterr().err
  assert _run(setup, "--task", "continue", "--prompt_wav", wav, "--out", out, "--max_prompt_seconds", "1.0") == 1
  (row,) = _read_report(str(setup["root"] / "err" / "x_report.jsonl"))
  assert "prompt too long for the model" in row["error"] and wav in row["error"]


# ----------------------------------------------------------------------------- devices and processes


@pytest.fixture(scope="module")
def spread_manifest(setup, manifest_run):
  """Examples "a", "b", "c" of `manifest_run` (same ids, so the same random streams) around a
  missing file: with two processes, "a" goes to process 0 and "b", "c" to process 1."""
  (a_wav, a_text), (_, b_text), (c_wav, c_text) = (setup["clips"][n] for n in CLIPS)
  stereo = str(setup["root"] / "manifest" / "stereo.wav")
  lines = [
      {"id": "a", "prompt_wav": a_wav, "prompt_text": a_text, "text": "Good morning.", "target_seconds": 1.0},
      {"id": "b", "prompt_wav": stereo, "prompt_text": b_text, "text": "Nice to see you.",
       "target_seconds": 2.2},
      {"id": "missing", "prompt_wav": "nope.wav", "prompt_text": "x", "text": "Hello."},
      {"id": "c", "prompt_wav": c_wav, "prompt_text": c_text, "text": "The weather is fine.",
       "reference_wav": a_wav},
  ]
  path = setup["root"] / "spread.jsonl"
  path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  return str(path)


def _same_outputs_as_one_device(out_dir, baseline_dir, atol=0.0):
  """The report lists the 4 examples once each, in manifest order; the 3 good ones have the
  audio the one-device run gave (to `atol`)."""
  report = _read_report(os.path.join(out_dir, "report.jsonl"))
  assert [(r["index"], r["id"], r["status"]) for r in report] == [
      (0, "a", "ok"), (1, "b", "ok"), (2, "missing", "error"), (3, "c", "ok")]
  summary = json.loads(open(os.path.join(out_dir, "summary.json")).read())
  assert (summary["examples"], summary["ok"], summary["failed"]) == (4, 3, 1)
  for ex_id in ("a", "b", "c"):
    audio, expected = (soundfile.read(os.path.join(d, f"{ex_id}.wav"))[0] for d in (out_dir, baseline_dir))
    np.testing.assert_allclose(audio, expected, rtol=0, atol=atol)
  assert sorted(f for f in os.listdir(out_dir) if f.endswith(".wav")) == ["a.wav", "b.wav", "c.wav"]
  return report


def test_two_devices_give_the_audio_of_one(setup, manifest_run, spread_manifest):
  """The batch of 4 split over 2 devices (2 rows each) decodes as on one device (4 rows)."""
  _, _, baseline = manifest_run
  out_dir = str(setup["root"] / "two_devices")
  assert _run(setup, "--task", "tts", "--manifest", spread_manifest, "--output_dir", out_dir,
              "--devices_per_process", "2") == 1
  _same_outputs_as_one_device(out_dir, str(baseline))


def test_two_processes_give_the_audio_of_one(setup, manifest_run, spread_manifest, tmp_path):
  """Two JAX processes (1 CPU device each, gloo over loopback) share the manifest: each writes the
  wavs of its own examples, process 0 the merged report; the audio is the one-process audio."""
  _, _, baseline = manifest_run
  out_dir = str(tmp_path / "out")
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith("METIS_")}
  # The suite's flags (optimization level 0): its float arithmetic moves a few samples by one
  # 16-bit step (different tokens would change the audio everywhere).
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=conftest.xla_flags(1),
             PYTHONPATH=conftest.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  command = [sys.executable, "-m", "metis_jax.decode"] + setup["flags"] + [
      "--task", "tts", "--manifest", spread_manifest, "--output_dir", out_dir,
      "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"]
  procs = [subprocess.Popen(command + ["--process_id", str(i)], env=env, cwd=conftest.REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [1, 1], "\n".join(log[-3000:] for log in logs)
  _same_outputs_as_one_device(out_dir, str(baseline), atol=2 / 32768)
  # Progress lines and the summary table come from process 0 only; failures from their owner.
  assert "examples/s" in logs[0] and "examples/s" not in logs[1]
  assert "missing: FAILED" in logs[0] and "2 processes" in logs[0]
