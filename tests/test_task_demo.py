"""The fine-tuning demo's held-out sets (inference/task_heldout.py), the baseline measures of the
decode report (evaluation, report_html), `decode --bundle` and the demo command's input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from metis_jax import cli_support
from metis_jax.data import noise as noise_lib
from metis_jax.data import tasks as task_data
from metis_jax.data import tokenizer as tk
from metis_jax.inference import cli, evaluation, report_html, task_demo, task_heldout
from metis_jax.inference import tasks as decode_tasks
from tests.test_data_tasks import write_corpus

OPTS = task_data.TaskOptions(max_length=64, min_tokens=20, prompt_tokens=(10, 20), reverb_prob=0.0,
                             snr_db=(0.0, 10.0), sir_db=(-3.0, 3.0))
HELDOUT = lambda rid: rid.endswith("_2")  # the last utterance of each of the 3 speakers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("heldout_corpus"))
  source, _ = write_corpus(root)
  noise_lib.make_demo_noise(root, seconds=2.0)
  return task_heldout.TaskCorpus(source, OPTS, (os.path.join(root, "noise"),), (os.path.join(root, "rir"),))


def _sets(corpus, out, seed=0):
  return {t: task_heldout.write_task_set(t, corpus, str(out / t), seed=seed, target_filter=HELDOUT)
          for t in task_heldout.TASKS}


def _lines(manifest):
  with open(manifest) as f:
    return [json.loads(line) for line in f]


def _wav(manifest, name):
  wav, rate = soundfile.read(os.path.join(os.path.dirname(manifest), name), dtype="float32")
  assert rate == 16000
  return wav


def _level_db(signal, residual):
  return 10 * np.log10(np.sum(np.square(signal, dtype=np.float64)) / np.sum(np.square(residual, dtype=np.float64)))


def _crop_of(reference, clean):
  """The gain and 320-sample offset at which `reference` is a scaled slice of `clean` (else None)."""
  for k in range(0, len(clean) - len(reference) + 1, task_data.SAMPLES_PER_TOKEN):
    piece = clean[k:k + len(reference)]
    gain = float(piece @ reference / (piece @ piece))
    if np.allclose(gain * piece, reference, atol=1e-5):
      return gain, k
  return None


def test_heldout_sets_are_corrupted_clean_targets(corpus, tmp_path):
  manifests = _sets(corpus, tmp_path)
  root = json.load(open(os.path.join(corpus.source, "manifest.json")))["input"]
  for task, manifest in manifests.items():
    lines = _lines(manifest)
    assert sorted(l["record_ids"]["target"] for l in lines) == ["spk_a/spk_a_2", "spk_b/spk_b_2", "spk_c/spk_c_2"]
    for line in lines:
      inp, ref = _wav(manifest, line["wav"]), _wav(manifest, line["reference_wav"])
      target = line["record_ids"]["target"]
      # the reference is the clean target (a crop of its corpus file, at the input's scale) ...
      clean, _ = soundfile.read(os.path.join(root, target + ".wav"), dtype="float32")
      assert _crop_of(ref, clean) is not None, (task, target)
      longest = OPTS.max_length - (0 if task == "se" else OPTS.prompt_tokens[1])
      assert tk.num_ssl_frames(len(ref)) == line["target_tokens"] <= longest
      # ... the input is time-aligned with it and corrupted as drawn
      assert len(inp) == len(ref) and not np.allclose(inp, ref, atol=1e-3)
      if task == "se":
        assert OPTS.snr_db[0] <= line["snr_db"] <= OPTS.snr_db[1]
        assert _level_db(ref, inp - ref) == pytest.approx(line["snr_db"], abs=0.01)
        assert "prompt_wav" not in line
        continue
      speaker = target.split("/")[0]
      prompt_id = line["record_ids"]["prompt"]
      assert prompt_id.split("/")[0] == speaker and prompt_id != target
      prompt = _wav(manifest, line["prompt_wav"])
      assert tk.num_ssl_frames(len(prompt)) == line["prompt_tokens"]  # the tokens trained on
      assert OPTS.prompt_tokens[0] <= line["prompt_tokens"] <= OPTS.prompt_tokens[1]
      if task == "tse":
        assert line["record_ids"]["interferer"].split("/")[0] != speaker
        assert OPTS.sir_db[0] <= line["sir_db"] <= OPTS.sir_db[1]
        assert _level_db(ref, inp - ref) == pytest.approx(line["sir_db"], abs=0.01)
      else:
        assert line["reference_aligned"] is True
        assert OPTS.vc_semitones[0] <= abs(line["semitones"]) <= OPTS.vc_semitones[1]
        assert 1 / OPTS.vc_formant <= line["formant_factor"] <= OPTS.vc_formant
        assert _crop_of(ref, clean)[0] == pytest.approx(1.0, abs=1e-4)  # VC keeps the clean level


def test_heldout_sets_are_deterministic_by_seed(corpus, tmp_path):
  first, again, other = _sets(corpus, tmp_path / "a"), _sets(corpus, tmp_path / "b"), _sets(corpus, tmp_path / "c", 1)
  for task in task_heldout.TASKS:
    a, b, c = _lines(first[task]), _lines(again[task]), _lines(other[task])
    assert a == b
    for la, lb in zip(a, b):
      np.testing.assert_array_equal(_wav(first[task], la["wav"]), _wav(again[task], lb["wav"]))
    key = {"se": "snr_db", "tse": "sir_db", "vc": "semitones"}[task]
    assert [l[key] for l in a] != [l[key] for l in c]


def test_corpus_of_run_reads_the_finetune_config(corpus):
  config = {"train": {"seq_length": 128}, "data": {"train_sources": [corpus.source]},
            "finetune": {"task": "se", "snr_db": [-5.0, 20.0], "prompt_tokens": [10, 40], "reverb_prob": 0.3,
                         "noise_dirs": list(corpus.noise_dirs), "base": "/x", "trainable": "lora+adapter"}}
  got = task_heldout.corpus_of_run(config)
  assert got.opts.max_length == 128 and got.opts.snr_db == (-5.0, 20.0) and got.opts.prompt_tokens == (10, 40)
  assert got.opts.reverb_prob == 0.0 and got.noise_dirs == corpus.noise_dirs  # noise only: a dry reference
  with pytest.raises(task_heldout.HeldoutError, match="no such folder"):
    task_heldout.corpus_of_run(dict(config, data={"train_sources": ["/nonexistent/shards"]}))
  with pytest.raises(task_heldout.HeldoutError, match="not the config of a fine-tune"):
    task_heldout.corpus_of_run({"train": {}, "data": {}})


# ----------------------------------------------------------------------------- baseline measures


def test_signal_metrics_of_the_input_carry_the_suffix():
  rng = np.random.default_rng(0)
  clean = rng.standard_normal(24000).astype(np.float32)
  noise = rng.standard_normal(24000).astype(np.float32)
  noise *= np.sqrt(np.sum(clean ** 2) / np.sum(noise ** 2) / 10.0)  # 10 dB below the clean signal
  m = evaluation.signal_metrics(clean + noise, clean, 24000, suffix="_input")
  assert {"si_snr_input", "mel_distance_input"} <= set(m) and "si_snr" not in m
  assert m["si_snr_input"] == pytest.approx(10.0, abs=0.5)
  assert evaluation.token_accuracy(np.array([1, 2, 3, 4]), np.array([1, 0, 3])) == pytest.approx(2 / 3)


def _rows():
  return [{"id": "a", "index": 0, "task": "se", "status": "ok", "seconds": 1.0, "si_snr": -30.0,
           "si_snr_input": 5.0, "mel_distance": 1.0, "mel_distance_input": 2.0, "token_accuracy": 0.3,
           "token_accuracy_input": 0.1},
          {"id": "b", "index": 1, "task": "se", "status": "ok", "seconds": 1.0, "si_snr": -20.0,
           "si_snr_input": 15.0, "mel_distance": 2.0, "mel_distance_input": 1.0, "token_accuracy": 0.5,
           "token_accuracy_input": 0.3},
          {"id": "c", "index": 2, "task": "vc", "status": "ok", "seconds": 1.0, "mel_distance": 3.0},
          {"id": "d", "index": 3, "task": "se", "status": "error", "error": "x"}]


def test_baseline_rows_pair_output_and_input_means():
  got = {(e["group"], e["key"]): e for e in evaluation.baseline_rows(_rows())}
  assert set(got) == {("se", "si_snr"), ("se", "mel_distance"), ("se", "token_accuracy")}  # vc: no input side
  snr, mel, acc = got["se", "si_snr"], got["se", "mel_distance"], got["se", "token_accuracy"]
  assert (snr["n"], snr["input"], snr["output"], snr["better"]) == (2, 10.0, -25.0, False)
  assert (mel["input"], mel["output"], mel["better"]) == (1.5, 1.5, False)  # lower is better; a tie is not
  assert acc["output"] == pytest.approx(0.4) and acc["input"] == pytest.approx(0.2) and acc["better"]
  report = evaluation.Report(None)
  for row in _rows():
    report.add(row)
  summary = report.summary(2.0)
  assert summary["mean_si_snr_input"] == 10.0 and summary["mean_mel_distance_input"] == 1.5
  table = report.table()
  assert "input SI-SNR" in table and "input mel dist" in table and "against the input" in table
  assert "10.00" in table and "-25.00" in table


def test_report_html_shows_the_baseline_table(tmp_path):
  rows = _rows()
  path = report_html.write(str(tmp_path / "report.html"), rows, {"examples": 4, "ok": 3}, evaluation.SUMMARY_COLUMNS)
  text = open(path, encoding="utf-8").read()
  table = text[text.index("<table id='baseline'>"):]
  table = table[:table.index("</table>")]
  assert table.count("<tr>") == 4  # header + 3 measures of se
  assert "<td>10.00</td><td>-25.00</td>" in table and "<th>input SI-SNR dB</th>" in text
  assert "http://" not in text and "https://" not in text


# ----------------------------------------------------------------------------- decode inputs


def test_vc_reference_aligned_field(tmp_path):
  rate = 16000
  t = np.arange(rate) / rate
  for name, f0 in (("src", 150.0), ("voice", 200.0), ("ref", 120.0)):
    soundfile.write(tmp_path / f"{name}.wav", 0.3 * np.sin(2 * np.pi * f0 * t), rate)
  ctx = decode_tasks.Context(decode_tasks.TaskSettings(), lambda: None, False, True)
  fields = {"wav": str(tmp_path / "src.wav"), "prompt_wav": str(tmp_path / "voice.wav"),
            "reference_wav": str(tmp_path / "ref.wav")}
  job = lambda **extra: decode_tasks.VCTask().prepare(decode_tasks.Example(0, "x", dict(fields, **extra), "o.wav"),
                                                      ctx)
  assert job().reference_wav24 is None and job().reference_wav16 is not None  # another timing by default
  aligned = job(reference_aligned=True)
  assert aligned.reference_wav24 is not None and aligned.input_wav16 is not None
  with pytest.raises(decode_tasks.ExampleError, match="reference_aligned"):
    job(reference_aligned="yes")


def test_decode_bundle_flag_fills_the_missing_parts(tmp_path):
  bundle = tmp_path / "job"
  bundle.mkdir()
  (bundle / "decode_bundle.json").write_text(json.dumps({"version": 1, "parts": {
      "stage1": ".", "s2a_1layer": "s2a_1layer", "s2a_full": "s2a_full", "ssl_tokenizer": "demo_data/tokenizer",
      "acoustic_tokenizer": "demo_data/acoustic_c256/tokenizer"}, "renderer": {"type": "griffin_lim_mel",
                                                                               "iterations": 7}}))
  task = decode_tasks.get_task("se")
  parts = cli.resolve_parts(cli.Args.create(model="/ft/export/model", bundle=str(bundle)), task)
  assert parts.stage1 == "/ft/export/model" and parts.origin["stage1"] == "flag"
  assert parts.s2a_full == str(bundle / "s2a_full") and parts.origin["s2a_full"] == "bundle"
  assert parts.tokenizer == str(bundle / "demo_data" / "tokenizer")
  assert parts.renderer == str(bundle / "demo_data" / "acoustic_c256" / "tokenizer")
  assert parts.renderer_options == {"iterations": 7}
  own = cli.resolve_parts(cli.Args.create(model="/m", bundle=str(bundle), s2a_full="/mine"), task)
  assert own.s2a_full == "/mine" and own.origin["s2a_full"] == "flag"
  alone = cli.resolve_parts(cli.Args.create(bundle=str(bundle)), task)
  assert alone.stage1 == str(bundle)
  with pytest.raises(cli.UsageError, match="no decode_bundle.json"):
    cli.resolve_parts(cli.Args.create(model="/m", bundle=str(tmp_path)), task)


def test_task_demo_input_errors(tmp_path):
  with pytest.raises(cli_support.UserError, match="expected task=DIR"):
    task_demo.parse_finetunes(["se"])
  with pytest.raises(cli_support.UserError, match="not one of se, tse, vc"):
    task_demo.parse_finetunes(["tts=/x"])
  with pytest.raises(cli_support.UserError, match="neither a fine-tune workdir"):
    task_demo.parse_finetunes([f"se={tmp_path}"])
  (tmp_path / "export" / "model").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps({"finetune": {"task": "vc"}}))
  with pytest.raises(cli_support.UserError, match="is a 'vc' fine-tune, not 'se'"):
    task_demo.parse_finetunes([f"se={tmp_path}"])
  model, config = task_demo.parse_finetunes([f"vc={tmp_path}"])["vc"]
  assert model == str(tmp_path / "export" / "model") and config["finetune"]["task"] == "vc"
  result = subprocess.run([sys.executable, "-m", "metis_jax.inference.task_demo", "--bundle", str(tmp_path),
                           "--finetune", f"se={tmp_path}", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
