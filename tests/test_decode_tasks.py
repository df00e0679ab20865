"""End to end: the fine-tuned tasks (se, tse, vc, l2s, omni) of `python -m metis_jax.decode` on tiny
random models.

The adapter models read the `cheap` condition feature (160 dims, see
frontend.condition_features; the k-means tokenizer has no w2v-BERT encoder)
and are saved as converted folders with `cond_feature` in their config. The
S2A models, codec and tokenizer are those of test_decode_cli. Runs share one
engine per model (in-process `run_cli`) and one padded shape
(`--token_quantum 250`), on one device.
"""

import json
import os

import jax
import numpy as np
import pytest
import soundfile

from metis_jax.conversion import cli as convert
from metis_jax.inference import cli as decode
from metis_jax.models import metis
from tests import conftest, helpers
from tests.test_decode_cli import SSL_VOCAB, build_models
from tests.test_decode_units import random_params_like

pytestmark = pytest.mark.slow  # a few minutes on 2 CPU cores

SPEECH = conftest.SPEECH
NOISY, MIX, ENROLL = "metis_se_noise", "metis_tse_mix", "metis_tse_prompt"
SOURCE, TARGET_VOICE, CLEAN = "metis_vc_source", "metis_vc_prompt", "libritts_260_123440_000010_000004"


def _adapter_model(root, name, use_phone_cond, seed):
  cfg = helpers.tiny_model_config(hidden_size=32, num_layers=1, num_heads=2, vocab_size=SSL_VOCAB,
                                  use_phone_cond=use_phone_cond, cond_feature_dim=160)
  cfg.cond_feature = "cheap"
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0))), seed)
  params["adapter"]["gate_scale"] = np.asarray(1.0, np.float32)  # a live adapter (it starts at 0)
  path = os.path.join(root, name)
  convert.save_converted(path, cfg, params)
  return path


def _l2s_model(root):
  cfg = helpers.tiny_model_config(hidden_size=32, num_layers=1, num_heads=2, vocab_size=SSL_VOCAB,
                                  cond_feature_dim=768, adapter_gated=False)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0))), 5)
  path = os.path.join(root, "l2s")
  convert.save_converted(path, cfg, params)
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  conftest.require_dir(SPEECH)
  root = tmp_path_factory.mktemp("tasks")
  models = str(root / "models")
  flags = build_models(models)
  flags = flags[:flags.index("--vocab")] + flags[flags.index("--vocab") + 2:]
  model_at = flags.index("--model") + 1
  paths = {"ft": _adapter_model(models, "ft", False, 3), "omni": _adapter_model(models, "omni", True, 4),
           "l2s": _l2s_model(models)}
  wav = lambda name: os.path.join(SPEECH, name + ".wav")
  return {"root": root, "flags": flags, "model_at": model_at, "paths": paths, "wav": wav}


def _run(setup, model, *argv):
  flags = list(setup["flags"])
  flags[setup["model_at"]] = setup["paths"][model]
  return decode.run_cli(["decode"] + flags + list(argv))


def _report(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _seconds(path):
  info = soundfile.info(path)
  return info.frames / info.samplerate


def test_se_one_example_keeps_the_input_length_and_is_scored(setup):
  out = str(setup["root"] / "se" / "se.wav")
  noisy = setup["wav"](NOISY)
  assert _run(setup, "ft", "--task", "se", "--wav", setup["wav"](CLEAN), "--reference_wav",
              setup["wav"](CLEAN), "--out", out, "--html_report=false") == 0
  (row,) = _report(str(setup["root"] / "se" / "se_report.jsonl"))
  assert row["status"] == "ok" and row["task"] == "se"
  # As many tokens as the input has frames (SSL rule: ceil(F / 2), F = (N - 400) // 160 + 1).
  n16 = int(round(_seconds(setup["wav"](CLEAN)) * 16000))
  frames = ((n16 - 400) // 160 + 1 + 1) // 2
  assert row["target_tokens"] == frames and len(soundfile.read(out)[0]) == frames * 480
  assert np.isfinite(row["si_snr"]) and row["mel_distance"] > 0 and np.isfinite(row["nll"])
  assert row["rtf"] > 0
  del noisy


def test_se_same_seed_same_audio(setup):
  outs = []
  for i, seed in enumerate((5, 5, 6)):
    out = str(setup["root"] / "se_seed" / f"{i}.wav")
    assert _run(setup, "ft", "--task", "se", "--wav", setup["wav"](CLEAN), "--seed", str(seed),
                "--out", out, "--html_report=false") == 0
    outs.append(soundfile.read(out)[0])
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])


def test_windowed_input_equals_single_pass_when_one_window_suffices(setup):
  outs = []
  for i, window in enumerate(("0", "30")):  # no windows / one window covering the input
    out = str(setup["root"] / "se_window" / f"{i}.wav")
    assert _run(setup, "ft", "--task", "se", "--wav", setup["wav"](NOISY), "--window_seconds", window,
                "--out", out, "--html_report=false") == 0
    outs.append(soundfile.read(out)[0])
  np.testing.assert_array_equal(outs[0], outs[1])


def _frame_rms(x, size=240):
  n = len(x) // size
  return np.sqrt(np.mean(x[:n * size].reshape(n, size) ** 2, axis=1) + 1e-12)


def test_long_input_runs_in_windows_without_seams(setup):
  """10 s of noisy speech in 4 s windows overlapping by 1 s: 3 windows, crossfaded. At each join the
  short-time energy stays within the range the output has elsewhere, and no sample jumps more than
  anywhere else."""
  out = str(setup["root"] / "se_long" / "long.wav")
  assert _run(setup, "ft", "--task", "se", "--wav", setup["wav"](NOISY), "--window_seconds", "4",
              "--window_overlap_seconds", "1", "--out", out, "--html_report=false") == 0
  (row,) = _report(str(setup["root"] / "se_long" / "long_report.jsonl"))
  assert row["windows"] == 3 and row["chunks"] == 3
  audio = soundfile.read(out)[0]
  assert abs(len(audio) / 24000 - _seconds(setup["wav"](NOISY))) < 0.05
  rms = _frame_rms(audio)  # 10 ms frames
  joins = [int(s * 100) for s in (3.0, 3.5, 4.0, 6.0, 6.5, 7.0)]  # overlaps [3, 4] s and [6, 7] s
  inner = np.concatenate([rms[50:250], rms[450:550], rms[750:950]])  # away from the overlaps
  lo, hi = np.percentile(inner, 1), np.percentile(inner, 99)
  for j in joins:
    assert 0.5 * lo <= rms[j] <= 2.0 * hi, (j, rms[j], lo, hi)
  # log-energy steps between neighbouring frames at the joins are no larger than elsewhere
  steps = np.abs(np.diff(np.log(rms)))
  assert max(steps[j - 2:j + 2].max() for j in joins) <= steps.max()
  jumps = np.abs(np.diff(audio))
  assert max(jumps[j * 240 - 480:j * 240 + 480].max() for j in joins) <= np.percentile(jumps, 99.99) + 1e-6


def test_tse_vc_manifest_with_a_bad_line(setup):
  root = setup["root"] / "tse"
  root.mkdir()
  wav = setup["wav"]
  lines = [
      {"id": "t1", "wav": wav(MIX), "prompt_wav": wav(ENROLL), "reference_wav": wav(CLEAN)},
      {"id": "nope", "wav": "missing.wav", "prompt_wav": wav(ENROLL)},
      {"id": "t2", "mixture_wav": wav(CLEAN), "prompt_wav": wav(ENROLL)},
  ]
  (root / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n{broken\n")
  out_dir = root / "out"
  assert _run(setup, "ft", "--task", "tse", "--manifest", str(root / "m.jsonl"), "--output_dir",
              str(out_dir), "--window_seconds", "0", "--html_report=false") == 1
  rows = {r["id"]: r for r in _report(str(out_dir / "report.jsonl"))}
  assert rows["t1"]["status"] == rows["t2"]["status"] == "ok"
  assert "missing.wav" in rows["nope"]["error"] and "no such file" in rows["nope"]["error"]
  assert "not a JSON object" in rows["line4"]["error"]
  # target = frames of [prompt; input] - prompt tokens: about the input's duration
  for ex_id, name in (("t1", MIX), ("t2", CLEAN)):
    assert abs(_seconds(str(out_dir / f"{ex_id}.wav")) - _seconds(wav(name))) < 0.1
  assert np.isfinite(rows["t1"]["si_snr"]) and np.isfinite(rows["t1"]["nll"])
  out = str(setup["root"] / "vc" / "vc.wav")
  assert _run(setup, "ft", "--task", "vc", "--wav", wav(SOURCE), "--prompt_wav", wav(TARGET_VOICE),
              "--out", out, "--html_report=false") == 0
  assert abs(_seconds(out) - _seconds(wav(SOURCE))) < 0.1


def test_aligned_vc_reference_is_scored_against_the_input(setup):
  """A VC line with `reference_aligned` gets the output's measures and the input's (the baseline),
  with token accuracies against the reference's tokens; without it, NLL only. The input here is
  the reference itself, so its measures are exact: token accuracy 1, mel distance 0."""
  root = setup["root"] / "vc_aligned"
  root.mkdir()
  wav = setup["wav"]
  lines = [{"id": "v1", "wav": wav(CLEAN), "prompt_wav": wav(TARGET_VOICE), "reference_wav": wav(CLEAN),
            "reference_aligned": True},
           {"id": "v2", "wav": wav(SOURCE), "prompt_wav": wav(TARGET_VOICE), "reference_wav": wav(CLEAN)}]
  (root / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  out_dir = root / "out"
  assert _run(setup, "ft", "--task", "vc", "--manifest", str(root / "m.jsonl"), "--output_dir",
              str(out_dir), "--window_seconds", "0") == 0
  rows = {r["id"]: r for r in _report(str(out_dir / "report.jsonl"))}
  v1, v2 = rows["v1"], rows["v2"]
  assert v1["token_accuracy_input"] == 1.0 and v1["mel_distance_input"] == pytest.approx(0.0, abs=1e-9)
  assert v1["si_snr_input"] > 60 and np.isfinite(v1["si_snr"]) and v1["mel_distance"] > 0
  assert 0.0 <= v1["token_accuracy"] <= 1.0 and np.isfinite(v1["nll"])
  assert np.isfinite(v2["nll"]) and not {"si_snr", "si_snr_input", "token_accuracy"} & set(v2)
  page = (out_dir / "report.html").read_text()
  assert "<table id='baseline'>" in page and "<th>input mel dist</th>" in page


def test_l2s_from_visual_features(setup, tmp_path):
  feats = np.random.default_rng(0).standard_normal((40, 768)).astype(np.float32)  # 1.6 s at 25 fps
  np.save(tmp_path / "v.npy", feats)
  np.save(tmp_path / "bad.npy", feats[:, :100])
  out = str(tmp_path / "l2s.wav")
  assert _run(setup, "l2s", "--task", "l2s", "--visual_features", str(tmp_path / "v.npy"), "--prompt_wav",
              setup["wav"](CLEAN), "--out", out, "--html_report=false") == 0
  assert len(soundfile.read(out)[0]) == 80 * 480  # 2 tokens per video frame
  assert _run(setup, "l2s", "--task", "l2s", "--visual_features", str(tmp_path / "bad.npy"),
              "--out", str(tmp_path / "bad.wav"), "--html_report=false") == 1
  (row,) = _report(str(tmp_path / "bad_report.jsonl"))
  assert "bad.npy" in row["error"] and "[frames, 768]" in row["error"]


def test_omni_serves_se_and_adapter_tasks_need_an_adapter(setup, capsys):
  out = str(setup["root"] / "omni" / "o.wav")
  assert _run(setup, "omni", "--task", "omni", "--omni_task", "se", "--wav", setup["wav"](CLEAN),
              "--out", out, "--html_report=false") == 0
  (row,) = _report(str(setup["root"] / "omni" / "o_report.jsonl"))
  assert row["omni_task"] == "se" and row["status"] == "ok"
  flags = list(setup["flags"])
  assert decode.run_cli(["decode"] + flags + ["--task", "se", "--wav", setup["wav"](CLEAN),
                                              "--out", out]) == 2
  assert "needs a fine-tuned model with a condition adapter" in capsys.readouterr().err


def test_report_html_of_a_run_loads_in_the_browser(setup):
  """An SE manifest (one good example with a reference, one missing file): report.html beside
  report.jsonl, whose players (input, output, reference) and spectrograms all load in Chromium."""
  from tests import test_report_html  # pylint: disable=g-import-not-at-top
  root = setup["root"] / "html"
  root.mkdir()
  lines = [{"id": "s1", "wav": setup["wav"](CLEAN), "reference_wav": setup["wav"](CLEAN)},
           {"id": "gone", "wav": "gone.wav"}]
  (root / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  out_dir = root / "out"
  assert _run(setup, "ft", "--task", "se", "--manifest", str(root / "m.jsonl"), "--output_dir",
              str(out_dir)) == 1
  rows = {r["id"]: r for r in _report(str(out_dir / "report.jsonl"))}
  assert sorted(rows["s1"]["media"]) == ["input", "output", "reference"]
  page = out_dir / "report.html"
  text = page.read_text()
  assert "gone.wav" in text and "<h2>Summary</h2>" in text and "<table id='baseline'>" in text
  status = test_report_html._status(test_report_html._loaded_dom(str(page)))
  assert status == {"loaded": 6, "failed": 0, "total": 6}, status
