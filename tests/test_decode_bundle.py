"""`decode` from the default job's workdir alone, from a released folder, and refusing parts that do
not belong together (issue 16).

  * refusals: a bundle whose S2A was trained on another SSL tokenizer, a workdir given a foreign
    tokenizer or the neural codec in place of the acoustic tokenizer its S2A learned; the check
    runs on `lineage.json` and fingerprints before any model is loaded;
  * `--released_dir`: a folder arranged like the release from the parity fixtures' files (the
    fixtures' w2v-BERT and semantic codec do not fit each other, so the SSL tokenizer is a
    512-cluster k-means one given with --tokenizer), resynth and continue end to end;
  * (slow) the default job with 20 steps per model, then `decode --task continue / resynth` on
    its workdir alone, rendered by the Griffin-Lim mel renderer.
"""

import io
import json
import os

import numpy as np
import pytest
import soundfile

from metis_jax.data import acoustic_kmeans, fingerprint
from metis_jax.data import tokenizer as tokenizer_lib
from metis_jax.inference import cli as decode
from metis_jax.inference import demo_bundle, mel_renderer
from tests import conftest

PARITY = os.path.join(conftest.SHARED, "data", "parity")
FAST = ["--steps", "2", "--s2a_steps", "2,1", "--s2a_1layer_steps", "2", "--batch_size", "1",
        "--devices_per_process", "1", "--html_report=false"]


def _run(argv):
  """decode.run_cli -> (exit status, what it printed)."""
  stream = io.StringIO()
  code = decode.run_cli(["decode"] + list(argv), stream=stream)
  return code, stream.getvalue()


def _sine_wav(path, seconds=1.0, rate=24000):
  t = np.arange(int(seconds * rate)) / rate
  soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32),
                  rate)
  return path


def _kmeans(path, clusters, seed):
  centroids = np.random.default_rng(seed).standard_normal((clusters, tokenizer_lib.FEATURE_DIM)).astype(np.float32)
  tokenizer_lib.KMeansTokenizer(centroids, {"seed": seed}).save(path)
  return path


def _fake_bundle(root):
  """A workdir laid out as the default job writes it, with lineage but no trained weights (the check
  comes before loading). Returns {part: path}."""
  rng = np.random.default_rng(2)
  paths = {"stage1": root, "s2a_1layer": os.path.join(root, "s2a_1layer"),
           "s2a_full": os.path.join(root, "s2a_full"),
           "ssl_tokenizer": _kmeans(os.path.join(root, "demo_data", "tokenizer"), 16, 0),
           "acoustic_tokenizer": os.path.join(root, "demo_data", "acoustic")}
  acoustic_kmeans.ResidualKMeansAcousticTokenizer(
      rng.normal(size=(2, 4, 80)), np.zeros(80), np.ones(80)).save(paths["acoustic_tokenizer"])
  ssl = fingerprint.lineage_entry(paths["ssl_tokenizer"])
  acoustic = fingerprint.lineage_entry(paths["acoustic_tokenizer"])
  fingerprint.write_lineage(root, {"ssl_tokenizer": ssl})
  for name in ("s2a_1layer", "s2a_full"):
    fingerprint.write_lineage(paths[name], {"ssl_tokenizer": ssl, "acoustic_tokenizer": acoustic})
  with open(os.path.join(root, demo_bundle.BUNDLE_NAME), "w") as f:
    json.dump({"version": 1, "parts": {"stage1": ".", "s2a_1layer": "s2a_1layer", "s2a_full": "s2a_full",
                                       "ssl_tokenizer": "demo_data/tokenizer",
                                       "acoustic_tokenizer": "demo_data/acoustic"}}, f)
  return paths


def _error_line(printed):
  errors = [line for line in printed.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, printed
  assert not errors[0].startswith("error: error:"), errors[0]
  return errors[0]


@pytest.fixture()
def bundle(tmp_path):
  root = str(tmp_path / "job")
  return {"root": root, "paths": _fake_bundle(root), "prompt": _sine_wav(str(tmp_path / "p.wav")),
          "out": str(tmp_path / "out" / "x.wav")}


def _continue_args(b, *extra):
  return ["--task", "continue", "--model", b["root"], "--prompt_wav", b["prompt"], "--target_seconds", "1",
          "--out", b["out"]] + FAST + list(extra)


def test_bundle_whose_s2a_was_trained_on_another_tokenizer_is_refused(bundle):
  other = _kmeans(os.path.join(bundle["root"], "elsewhere"), 16, 1)
  lineage = fingerprint.read_lineage(bundle["paths"]["s2a_full"])
  lineage["ssl_tokenizer"] = fingerprint.lineage_entry(other)
  fingerprint.write_lineage(bundle["paths"]["s2a_full"], lineage)
  code, printed = _run(_continue_args(bundle))
  assert code == 2
  line = _error_line(printed)
  # Named: the S2A that disagrees and the part it disagrees on.
  assert "s2a_full" in line and bundle["paths"]["s2a_full"] in line and "ssl_tokenizer" in line, line
  assert fingerprint.fingerprint(other) in line
  assert not os.path.exists(bundle["out"])


def test_workdir_with_a_foreign_tokenizer_or_the_neural_codec_is_refused(bundle, tmp_path):
  foreign = _kmeans(str(tmp_path / "foreign_tokenizer"), 16, 7)  # same size: only the fingerprint tells
  code, printed = _run(_continue_args(bundle, "--tokenizer", foreign))
  assert code == 2
  line = _error_line(printed)
  assert f"the ssl_tokenizer {foreign}" in line and "does not belong to the stage1" in line, line
  # The S2A models learned the demo's residual k-means tokens: the acoustic codec is not their renderer.
  codec = os.path.join(PARITY, "acoustic_codec")
  code, printed = _run(_continue_args(bundle, "--codec_encoder", os.path.join(codec, "encoder.safetensors"),
                                      "--codec_decoder", os.path.join(codec, "decoder.safetensors")))
  assert code == 2
  line = _error_line(printed)
  assert "the acoustic_tokenizer" in line and "encoder.safetensors" in line and "s2a_1layer" in line, line


def test_stage1_workdir_without_a_bundle_is_checked_against_the_tokenizer_given(bundle, tmp_path):
  os.remove(os.path.join(bundle["root"], demo_bundle.BUNDLE_NAME))
  foreign = _kmeans(str(tmp_path / "foreign_tokenizer"), 16, 7)
  argv = _continue_args(bundle, "--tokenizer", foreign, "--s2a_full", bundle["paths"]["s2a_full"],
                        "--codec", os.path.join(PARITY, "acoustic_codec"))
  code, printed = _run(argv)
  assert code == 2
  line = _error_line(printed)
  assert f"the ssl_tokenizer {foreign}" in line and f"the stage1 {bundle['root']}" in line, line


def test_a_broken_bundle_is_one_error_line(bundle):
  with open(os.path.join(bundle["root"], demo_bundle.BUNDLE_NAME), "w") as f:
    json.dump({"version": 1, "parts": {"stage1": "."}}, f)
  code, printed = _run(_continue_args(bundle))
  assert code == 2
  line = _error_line(printed)
  assert demo_bundle.BUNDLE_NAME in line and "s2a_1layer" in line, line


# ----------------------------------------------------------------------------- the released folder

# Release path -> parity fixture (the released key names and layout at small sizes).
RELEASE_LAYOUT = {
    "t2s_model/model.safetensors": "t2s_phones/weights.safetensors",
    "s2a_model/s2a_model_1layer/model.safetensors": "s2a_1layer/weights.safetensors",
    "s2a_model/s2a_model_full/model.safetensors": "s2a_full/weights.safetensors",
    "acoustic_codec/model.safetensors": "acoustic_codec/encoder.safetensors",
    "acoustic_codec/model_1.safetensors": "acoustic_codec/decoder.safetensors",
    "semantic_codec/model.safetensors": "semantic_codec/weights.safetensors",
    "metis_base/model.safetensors": "metis_ft_adapter_lora/base.safetensors",
    "w2v-bert-2.0/model.safetensors": "hf_w2v_bert/weights.safetensors",
}
SSL_CODES = 512  # the fixtures' cond_codebook_size


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  conftest.require_dir(PARITY)
  root = tmp_path_factory.mktemp("release")
  released = str(root / "released")
  for rel, src in RELEASE_LAYOUT.items():
    dest = os.path.join(released, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.symlink(os.path.join(PARITY, src), dest)
  speech = conftest.require_dir(conftest.SPEECH)
  clip = sorted(f for f in os.listdir(speech) if f.endswith(".wav"))[0]
  return {"dir": released, "root": root, "wav": os.path.join(speech, clip),
          "tokenizer": _kmeans(str(root / "tokenizer"), SSL_CODES, 0)}


def test_released_dir_without_w2v_statistics_names_what_is_missing(release):
  code, printed = _run(["--task", "resynth", "--released_dir", release["dir"], "--wav", release["wav"],
                        "--out", str(release["root"] / "none.wav")] + FAST)
  assert code == 2
  line = _error_line(printed)
  assert "wav2vec2bert_stats.pt" in line and "--tokenizer" in line, line


@pytest.mark.slow
def test_released_dir_resynth_and_continue_end_to_end(release):
  out = str(release["root"] / "resynth" / "r.wav")
  code, printed = _run(["--task", "resynth", "--released_dir", release["dir"], "--tokenizer", release["tokenizer"],
                        "--wav", release["wav"], "--prompt_seconds", "1", "--out", out] + FAST)
  assert code == 0, printed
  parts = next(line for line in printed.splitlines() if "parts:" in line)
  for rel in ("s2a_model_full/model.safetensors", "s2a_model_1layer/model.safetensors",
              "acoustic_codec/model.safetensors", "acoustic_codec/model_1.safetensors"):
    assert rel + " (released)" in parts, parts
  assert "stage1" not in parts  # resynth needs none
  info = soundfile.info(release["wav"])
  audio, rate = soundfile.read(out)
  assert rate == 24000 and abs(len(audio) / rate - (info.frames / info.samplerate - 1.0)) < 0.05
  out = str(release["root"] / "continue" / "c.wav")
  code, printed = _run(["--task", "continue", "--released_dir", release["dir"], "--tokenizer", release["tokenizer"],
                        "--prompt_wav", release["wav"], "--max_prompt_seconds", "30", "--target_seconds", "1.5",
                        "--out", out] + FAST)
  assert code == 0, printed
  parts = next(line for line in printed.splitlines() if "parts:" in line)
  assert "stage1 " + os.path.join(release["dir"], "metis_base/model.safetensors") + " (released)" in parts, parts
  audio, rate = soundfile.read(out)
  assert len(audio) == int(1.5 * rate) and np.all(np.isfinite(audio))


# ----------------------------------------------------------------------------- the default job, end to end


def _heldout_prompt(workdir):
  return os.path.join(workdir, "demo_data", "corpus", "en", "en_m1", "en_m1_007.wav")


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  from metis_jax.training import demo_job, loop
  workdir = str(tmp_path_factory.mktemp("demo_job") / "job")
  config = demo_job.load_config("tiny.py")
  with config.unlocked():
    config.data.kmeans_iterations = 4
  demo_job.run_demo_job(workdir, config, stage1_steps=20, s2a_steps={"s2a_1layer": 20, "s2a_full": 20},
                        log=lambda s: None, train=loop.train)
  assert demo_bundle.is_bundle(workdir)
  return workdir


@pytest.mark.slow
def test_default_job_workdir_alone_continues_a_prompt_through_the_mel_renderer(demo_workdir, tmp_path):
  out = str(tmp_path / "continued.wav")
  code, printed = _run(["--task", "continue", "--model", demo_workdir, "--prompt_wav", _heldout_prompt(demo_workdir),
                        "--target_seconds", "3", "--out", out, "--devices_per_process", "1"])
  assert code == 0, printed
  assert "renderer (Griffin-Lim mel)" in printed and "(bundle)" in printed
  audio, rate = soundfile.read(out)
  assert rate == 24000 and len(audio) == 3 * 24000
  energy = mel_renderer.frame_energy_db(audio)
  assert np.sqrt(np.mean(audio ** 2)) > 1e-3 and np.ptp(energy) > 10, (np.sqrt(np.mean(audio ** 2)), np.ptp(energy))
  with open(os.path.splitext(out)[0] + "_report.jsonl") as f:
    (row,) = [json.loads(line) for line in f]
  assert row["status"] == "ok" and row["out"] == out and abs(row["seconds"] - 3.0) < 1e-6
  assert "1/1 examples, 3.0 s of audio" in printed


@pytest.mark.slow
def test_default_job_workdir_alone_resynthesizes_and_the_continuation_follows_the_prompt(demo_workdir, tmp_path):
  """Measures (prints, loose bounds only): resynthesis of a held-out clip, and the frame-energy
  contour of a continuation against its prompt and against the clip's true continuation."""
  from scipy.signal import resample_poly
  clip = _heldout_prompt(demo_workdir)
  out = str(tmp_path / "resynth.wav")
  code, printed = _run(["--task", "resynth", "--model", demo_workdir, "--wav", clip, "--prompt_seconds", "1",
                        "--out", out, "--devices_per_process", "1"])
  assert code == 0, printed
  with open(os.path.splitext(out)[0] + "_report.jsonl") as f:
    (row,) = [json.loads(line) for line in f]
  assert row["status"] == "ok" and np.isfinite(row["mel_distance"]) and np.isfinite(row["si_snr"])
  wav, rate = soundfile.read(clip, dtype="float32")
  wav24 = resample_poly(wav, 24000 // np.gcd(24000, rate), rate // np.gcd(24000, rate)).astype(np.float32)
  split = len(wav24) // 2 // 480 * 480
  prompt = str(tmp_path / "prompt.wav")
  soundfile.write(prompt, wav24[:split], 24000)
  cont = str(tmp_path / "cont.wav")
  seconds = (len(wav24) - split) / 24000
  code, printed = _run(["--task", "continue", "--model", demo_workdir, "--prompt_wav", prompt,
                        "--target_seconds", f"{seconds:.2f}", "--out", cont, "--devices_per_process", "1"])
  assert code == 0, printed
  audio, _ = soundfile.read(cont, dtype="float32")
  with_prompt = mel_renderer.energy_correlation(audio, wav24[:split])
  with_truth = mel_renderer.energy_correlation(audio, wav24[split:])
  print(f"\nresynth (1 s prompt) of {os.path.basename(clip)}: mel distance {row['mel_distance']:.3f}, "
        f"SI-SNR {row['si_snr']:.1f} dB; continuation energy-contour correlation: with the prompt "
        f"{with_prompt:.3f}, with the true continuation {with_truth:.3f}")
  assert np.isfinite(with_prompt) and np.isfinite(with_truth)


def test_released_stage1_files_per_part(release):
  from metis_jax.conversion import released
  files = released.stage1_files(release["dir"], "t2s")
  assert files == {"input": os.path.join(release["dir"], "t2s_model/model.safetensors"), "lora": None, "adapter": None}
  with pytest.raises(FileNotFoundError, match=r"^error: .*metis_se/metis_se_lora_32.safetensors"):
    released.stage1_files(release["dir"], "metis_se")
  with pytest.raises(ValueError, match="expected one of t2s, metis_base"):
    released.stage1_files(release["dir"], "s2a_fulll")
