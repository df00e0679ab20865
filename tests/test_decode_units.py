"""The pieces behind `metis_jax.decode`: text splitting, duration rules, length buckets, tasks,
metrics and the report."""

import json
import os

import jax
import numpy as np
import pytest

from metis_jax.parallel import batch_layout
from metis_jax.inference import cli as decode, engine as decode_engine, tasks as decode_tasks, decoding, evaluation, length_buckets, model_loading
from metis_jax.models import metis
from metis_jax.frontend import target_length, text_split
from tests import conftest, helpers

def random_params_like(abstract, seed):
  """Random parameters without running any initializer (no compilation)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    shape = leaf.shape
    if "to_weight" in name:
      return (1 + 0.01 * rng.standard_normal(shape) if name.endswith("bias")
              else 0.01 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(("alpha", "scale")):
      return (1 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("gamma"):
      return np.full(shape, 0.1, np.float32)
    if name.endswith("bias"):
      return (0.01 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) >= 2 and not any(k in name for k in ("embed", "codebook")):
      return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- text splitting


def test_sentences_are_split_at_ends_but_not_after_abbreviations():
  text = 'Mr. Smith met Dr. J. Watson at 3.5 p.m.? No! He said "stop." Then   he left… Ok 好。好吗？'
  assert text_split.split_sentences(text) == [
      "Mr. Smith met Dr. J. Watson at 3.5 p.m.?", "No!", 'He said "stop."', "Then he left…", "Ok 好。",
      "好吗？"]
  assert text_split.split_sentences("  ") == []


def test_chunks_stay_within_budget_and_keep_all_text():
  words = lambda s: len(s.split())
  text = ("One two three. Four five six seven. Eight nine, ten eleven twelve thirteen, fourteen. "
          "Fifteen.")
  chunks = text_split.split_text(text, words, budget=5)
  assert all(words(c) <= 5 for c in chunks)
  assert " ".join(chunks) == text
  # Whole sentences first; the long third sentence is cut at its commas.
  assert chunks[:3] == ["One two three.", "Four five six seven.", "Eight nine,"]
  assert text_split.split_text(text, words, budget=100) == [text]
  # A clause without commas over budget is cut at words; a single word is kept whole.
  assert text_split.split_text("a b c d e f g", words, budget=3) == ["a b c", "d e f", "g"]
  assert text_split.split_text("supercalifragilistic", len, budget=3) == ["supercalifragilistic"]


# ----------------------------------------------------------------------------- durations


def test_length_rules_follow_the_references():
  # MaskGCT: floor(prompt_sec * n_target / n_prompt * 50).
  assert target_length.phone_rate_tokens(3.0, 40, 20) == 75
  assert target_length.phone_rate_tokens(3.01, 40, 20) == 75  # floor(75.25)
  # Metis: prompt_tokens * bytes(text) // bytes(prompt_text); a CJK character is 3 bytes.
  assert target_length.byte_rate_tokens(150, "abcd", "abcdefgh") == 75
  assert target_length.byte_rate_tokens(150, "好", "abcdefgh") == 56
  assert target_length.seconds_to_tokens(2.2) == 110
  with pytest.raises(ValueError, match="no phones"):
    target_length.phone_rate_tokens(3.0, 0, 5)
  with pytest.raises(ValueError, match="positive"):
    target_length.seconds_to_tokens(0)


def test_split_tokens_is_exact_and_proportional():
  parts = target_length.split_tokens(200, [10, 30, 20, 1])
  assert sum(parts) == 200 and min(parts) >= 1
  assert parts[1] > parts[2] > parts[0] > parts[3]
  assert target_length.split_tokens(7, [1, 1, 1]) == [3, 2, 2]
  with pytest.raises(ValueError):
    target_length.split_tokens(2, [1, 1, 1])


# ----------------------------------------------------------------------------- batching


def test_batches_cover_every_item_once_with_few_padded_shapes():
  lengths = [(149, 60), (160, 240), (151, 55), (310, 40), (149, 61)]
  batches = length_buckets.make_batches(lengths, batch_size=2, quanta=(50, 50))
  assert sorted(i for b in batches for i in b.indices) == list(range(5))
  for b in batches:
    assert all(s % 50 == 0 for s in b.shape)
    assert all(lengths[i][d] <= b.shape[d] for i in b.indices for d in range(2))
  assert batches[0].indices == (0, 4)  # the two most alike go together
  rows = length_buckets.stack_padded([np.array([1, 2]), np.array([3])], 4, 3)
  np.testing.assert_array_equal(rows, [[1, 2, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0]])
  np.testing.assert_array_equal(length_buckets.pad_lengths([2, 1], 3), [2, 1, 1])


def test_process_plans_merge_into_the_same_global_batches():
  # Process 0 has two batches, process 1 one (and fewer rows): batch k is padded to the largest.
  plans = [[(100, 50, 2), (200, 50, 2)], [(150, 100, 1)], []]
  assert length_buckets.merge_plans(plans) == [((150, 100), 3), ((200, 50), 2)]
  assert length_buckets.merge_plans([[], []]) == []


def test_batch_layout_rows_and_round_trip():
  layout = batch_layout.BatchLayout(batch_layout.make_mesh(devices=jax.devices()[:4]))
  assert (layout.shards, layout.process_count, layout.round_rows(5), layout.round_rows(1)) == (4, 1, 8, 4)
  x = np.arange(24).reshape(8, 3)
  placed = layout.put(x)
  assert len(placed.sharding.device_set) == 4 and placed.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(layout.get(placed), x)
  assert [len(t) for t in layout.agree([(1, 2), (3, 4)], 2)] == [2]
  with pytest.raises(ValueError, match="fewer than"):
    batch_layout.select_devices(100)


# ----------------------------------------------------------------------------- tasks and options


def test_task_registry_and_reference_defaults():
  assert {"continue", "tts", "resynth", "se", "tse", "vc", "l2s", "omni"} <= set(decode_tasks.TASKS)
  d = decode_tasks.DECODE_DEFAULTS
  assert (d["tts"].steps, d["tts"].cfg, d["tts"].temperature) == (25, 2.5, 0.9)
  assert (d["vc"].steps, d["vc"].cfg) == (20, 1.0)
  assert (d["se"].steps, d["se"].cfg) == (d["tse"].steps, d["tse"].cfg) == (10, 0.0)
  assert (d["l2s"].steps, d["l2s"].cfg) == (25, 2.5)
  assert d["tts"].s2a_steps == (40, 16) + (1,) * 10 and d["tts"].s2a_first_cfg == 0.0
  assert d["tts"].s2a_temperature == 1.5 and d["tts"].rescale_cfg == 0.75
  with pytest.raises(ValueError, match="unknown task 'sing'"):
    decode_tasks.get_task("sing")
  assert decode_tasks.get_task("se").needs_adapter and not decode_tasks.get_task("tts").needs_adapter

  @decode_tasks.register_task
  class Echo(decode_tasks.Task):
    name = "echo_test"
  try:
    assert isinstance(decode_tasks.get_task("echo_test"), Echo)
  finally:
    del decode_tasks.TASKS["echo_test"]


def test_command_line_overrides_and_recipes():
  args = decode.Args.create(task="tts")
  assert decode.decode_defaults(args, "tts") == decode_tasks.DECODE_DEFAULTS["tts"]
  maskgct = decode.decode_defaults(decode.Args.create(recipe="maskgct"), "tts")
  assert maskgct.s2a_steps == (25, 10) + (1,) * 10
  assert (maskgct.s2a_first_steps, maskgct.s2a_first_cfg) == (25, 2.5)
  custom = decode.decode_defaults(decode.Args.create(steps=7, cfg=0.0, s2a_steps=["3", "2"]), "vc")
  assert (custom.steps, custom.cfg, custom.s2a_steps) == (7, 0.0, (3, 2))
  with pytest.raises(ValueError, match="unknown options"):
    decode.Args.create(stepz=3)


class _FakeG2P:
  """One phone per letter (no espeak): makes the duration arithmetic checkable."""

  def __call__(self, text, language):
    return [5] * sum(c.isalpha() for c in text)


def _tts_job(fields, **settings):
  speech = conftest.require_dir(conftest.SPEECH)
  clip = os.path.join(speech, "libritts_260_123440_000010_000004.wav")
  fields = dict(prompt_wav=clip, prompt_text="abcdefghij", **fields)
  ctx = decode_tasks.Context(decode_tasks.TaskSettings(**settings), _FakeG2P, True, True)
  return decode_tasks.get_task("tts").prepare(decode_tasks.Example(0, "x", fields, "x.wav"), ctx)


def test_tts_durations_from_the_prompt_rate_bytes_or_seconds():
  job = _tts_job({"text": "abcde"})  # half the prompt's phones
  prompt_seconds = len(job.prompt_wav16) / 16000
  assert job.target_tokens == int(prompt_seconds * 5 / 10 * 50)
  job = _tts_job({"text": "abcde"}, length_rule="byte_rate")
  from metis_jax.data import tokenizer as tokenizer_lib
  assert job.target_tokens == tokenizer_lib.num_ssl_frames(len(job.prompt_wav16)) * 5 // 10
  job = _tts_job({"text": "abcde", "target_seconds": 2.5})
  assert job.target_tokens == 125 and job.info["length_rule"] == "seconds"
  # Long text: chunks within the budget, tokens adding up to the requested total.
  job = _tts_job({"text": "Aaaa bbbb. Cccc dddd. Eeee ffff. Gg.", "target_seconds": 3.5},
                 chunk_seconds=1.4)  # 175 tokens for 26 letters (6.73 each), at most 70 per chunk
  assert [c.text for c in job.chunks] == ["Aaaa bbbb.", "Cccc dddd.", "Eeee ffff. Gg."]
  assert [c.tokens for c in job.chunks] == [54, 54, 67]


def test_tts_example_errors_name_the_problem(tmp_path):
  with pytest.raises(decode_tasks.ExampleError, match="empty text"):
    _tts_job({"text": ""})
  with pytest.raises(decode_tasks.ExampleError, match="prompt too long for the model"):
    _tts_job({"text": "abc"}, max_prompt_seconds=1.0)
  with pytest.raises(decode_tasks.ExampleError, match="unknown language 'xx'"):
    _tts_job({"text": "abc", "language": "xx"})
  with pytest.raises(decode_tasks.ExampleError, match="target_seconds' must be positive"):
    _tts_job({"text": "abc", "target_seconds": -1})
  (tmp_path / "empty.wav").write_bytes(b"")
  with pytest.raises(decode_tasks.ExampleError, match="empty.wav"):
    decode_tasks.load_audio(str(tmp_path / "empty.wav"), "prompt_wav")


def test_manifest_reading_resolves_paths_and_reports_bad_lines(tmp_path):
  m = tmp_path / "m.jsonl"
  m.write_text('{"id": "a", "prompt_wav": "p.wav", "text": "x"}\n[1, 2]\n\n{"id": "a"}\n{"text": "y"}\n')
  args = decode.Args.create(manifest=str(m), output_dir=str(tmp_path / "out"))
  examples, bad = decode.read_examples(args)
  assert [e.id for e in examples] == ["a", "00003"]
  assert examples[0].fields["prompt_wav"] == str(tmp_path / "p.wav")
  assert examples[0].out_path == str(tmp_path / "out" / "a.wav")
  assert ["not a JSON object" in msg for _, msg in bad] == [True, False]
  assert "duplicate id 'a'" in bad[1][1]
  with pytest.raises(decode.UsageError, match="--output_dir"):
    decode.read_examples(decode.Args.create(manifest=str(m)))


# ----------------------------------------------------------------------------- metrics and report


def test_signal_metrics():
  rng = np.random.default_rng(0)
  ref = rng.standard_normal(24000).astype(np.float32)
  assert evaluation.si_snr(3.0 * ref, ref) > 60  # scale-invariant
  noisy = ref + 0.1 * rng.standard_normal(24000)
  assert 19 < evaluation.si_snr(noisy, ref) < 21
  assert evaluation.mel_distance(ref, ref) == 0.0
  assert evaluation.mel_distance(noisy, ref) < evaluation.mel_distance(rng.standard_normal(24000), ref)


def test_word_error_rate_and_hooks():
  assert evaluation.word_error_rate("Hello, World!", "hello world") == 0.0
  assert evaluation.word_error_rate("hello there world", "hello world") == 0.5
  assert evaluation.word_error_rate("", "a b c d") == 1.0
  asr = evaluation.load_hook(f"{__name__}:fake_asr", "weights.bin")
  assert asr(np.zeros(10), 24000, "en") == "loaded weights.bin"
  with pytest.raises(ValueError, match="module:factory"):
    evaluation.load_hook("no_colon")
  with pytest.raises(ValueError, match="cannot import"):
    evaluation.load_hook(f"{__name__}:missing")


def fake_asr(weights):
  return lambda wav, rate, language: f"loaded {weights}"


def fake_speaker():
  """A 'speaker embedding': a few spectral statistics."""
  return lambda wav, rate: np.abs(np.fft.rfft(np.asarray(wav)[:4800], n=64))[:16]


def test_report_rows_summary_and_table(tmp_path):
  report = evaluation.Report(str(tmp_path / "r.jsonl"))
  report.add({"id": "b", "index": 1, "task": "tts", "status": "ok", "seconds": 2.0, "rtf": 0.5,
              "nll": np.float32(2.0)})
  report.add({"id": "c", "index": 2, "task": "tts", "status": "error", "error": "boom"})
  report.add({"id": "a", "index": 0, "task": "tts", "status": "ok", "seconds": 1.0, "rtf": 1.5,
              "nll": 4.0, "si_snr": float("nan")})
  report.close()
  rows = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[0]["si_snr"] is None
  summary = report.summary(wall_seconds=6.0)
  assert (summary["ok"], summary["failed"], summary["audio_seconds"]) == (2, 1, 3.0)
  assert summary["rtf"] == 2.0 and summary["mean_nll"] == 3.0
  table = report.table()
  assert "NLL" in table and "3.000" in table and "failed: 1" in table


@pytest.mark.slow
def test_masked_nll_does_not_depend_on_padding():
  cfg = helpers.tiny_model_config(hidden_size=32, num_layers=1, num_heads=2, vocab_size=64)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0))), 0)
  engine = decode_engine.SpeechEngine.__new__(decode_engine.SpeechEngine)
  engine.stage1 = model_loading.LoadedModel(cfg, model, params, "tiny")
  layout = batch_layout.BatchLayout(batch_layout.make_mesh(devices=jax.devices()[:1]))
  rng = np.random.default_rng(0)
  item = decode_engine.NLLItem(prompt=rng.integers(0, 64, 30), target=rng.integers(0, 64, 20),
                               key=jax.random.key(1))
  other = decode_engine.NLLItem(prompt=rng.integers(0, 64, 70), target=rng.integers(0, 64, 60),
                                key=jax.random.key(2))
  engine.set_layout(layout, decode_engine.EngineOptions(batch_size=2, token_quantum=50))
  alone = engine.masked_nll([item])[0]
  engine.set_layout(layout, decode_engine.EngineOptions(batch_size=2, token_quantum=100))
  together = engine.masked_nll([item, other])
  assert np.isfinite(alone) and alone > 0
  assert together[0] == pytest.approx(alone, rel=1e-5)
  assert together[1] != pytest.approx(alone, rel=1e-3)


@pytest.mark.slow
def test_stage1_tokens_do_not_depend_on_the_parameter_sharding():
  """Replicated parameters (per-device shard_map) and FSDP-sharded ones (GSPMD under the logical
  rules) decode the same tokens; so does one device."""
  cfg = helpers.tiny_model_config(hidden_size=32, num_layers=1, num_heads=2, vocab_size=64,
                                  use_phone_cond=True)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0))), 0)
  rng = np.random.default_rng(0)
  items = [decode_engine.Stage1Item(prompt=rng.integers(0, 64, 20 + 7 * i), target_len=30 + 5 * i,
                                    key=jax.random.key(i), phones=rng.integers(0, 10, 8)) for i in range(3)]
  outputs = {}
  for name, (data, fsdp, devices) in {"one": (1, 1, 1), "data": (2, 1, 2), "fsdp": (1, 2, 2)}.items():
    engine = decode_engine.SpeechEngine.__new__(decode_engine.SpeechEngine)
    engine.stage1 = model_loading.LoadedModel(cfg, model, params, "tiny")
    engine._decoder = decoding.MetisDecoder(model, decoding.DecodeOptions(steps=3))
    layout = batch_layout.BatchLayout(batch_layout.make_mesh(data, fsdp, 1, jax.devices()[:devices]))
    engine.set_layout(layout, decode_engine.EngineOptions(batch_size=3, token_quantum=50))
    assert engine.rows == (4 if devices == 2 else 3)
    sharded = {s.spec for s in jax.tree.leaves(engine._stage1_shardings)} != {jax.sharding.PartitionSpec()}
    assert sharded == (name == "fsdp")
    outputs[name] = engine.semantic(items)
  for one, data, fsdp in zip(outputs["one"], outputs["data"], outputs["fsdp"]):
    assert len(one) == len(data) == len(fsdp)
    np.testing.assert_array_equal(data, one)
    np.testing.assert_array_equal(fsdp, one)


# ----------------------------------------------------------------------------- model files


def test_stage1_models_load_from_every_layout(tmp_path):
  import orbax.checkpoint as ocp
  from metis_jax.conversion import t2s
  cfg = helpers.tiny_model_config(hidden_size=32, num_layers=1, num_heads=2, vocab_size=64,
                                  use_phone_cond=True)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0))), 0)
  # An Amphion safetensors file.
  t2s.save_amphion(str(tmp_path / "t2s.safetensors"), params, cfg)
  loaded = model_loading.load_stage1(str(tmp_path / "t2s.safetensors"), "float32")
  np.testing.assert_allclose(loaded.params["token_embed"]["embedding"], params["token_embed"]["embedding"])
  assert loaded.config.use_phone_cond and loaded.config.num_heads == 2
  # A training workdir: config.json + checkpoints/<step>/state (the newest step wins).
  work = tmp_path / "work"
  config = {"model": cfg.to_dict(), "train": {"steps": 10}}
  os.makedirs(work / "checkpoints" / "3")
  (work / "config.json").write_text(json.dumps(config))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(work / "checkpoints" / "12" / "state"), {"params": params, "step": np.int32(12)})
  checkpointer.wait_until_finished()
  loaded = model_loading.load_stage1(str(work))
  np.testing.assert_array_equal(loaded.params["to_logits"]["bias"], params["to_logits"]["bias"])
  with pytest.raises(FileNotFoundError, match="nowhere"):
    model_loading.load_stage1(str(tmp_path / "nowhere"))
  with pytest.raises(model_loading.ModelFileError, match="not a model folder"):
    model_loading.load_stage1(str(tmp_path))
  with pytest.raises(model_loading.ModelFileError, match="not an Amphion S2A file"):
    model_loading.load_s2a(str(tmp_path / "t2s.safetensors"))
  with pytest.raises(model_loading.ModelFileError, match="no codec files"):
    model_loading.codec_paths(str(tmp_path))


# ----------------------------------------------------------------------------- long-input windows


def test_windows_cover_the_input_on_the_token_grid():
  from metis_jax.inference import windows
  assert windows.plan(16000 * 5, 20.0, 1.0) == [windows.Window(0, 80000)]
  assert windows.plan(16000 * 500, 0.0, 1.0) == [windows.Window(0, 8000000)]
  n = 16000 * 61 + 123
  spans = windows.plan(n, 20.0, 1.0)
  assert spans[0].start == 0 and spans[-1].start + spans[-1].length == n
  for a, b in zip(spans, spans[1:]):
    assert b.start % 320 == 0 and b.start - a.start == 19 * 50 * 320   # hop = window - overlap
    assert a.start + a.length - b.start >= 50 * 320                     # at least the overlap
    assert a.length == 20 * 50 * 320 + 80                               # exactly 1000 tokens
  assert spans[-1].length > 50 * 320
  with pytest.raises(ValueError, match="overlap"):
    windows.plan(n, 2.0, 2.0)


def test_crossfade_join_restores_a_signal_cut_into_overlapping_windows():
  from metis_jax.inference import windows
  rng = np.random.default_rng(0)
  signal = rng.standard_normal(24000 * 9).astype(np.float32)
  spans = windows.plan(16000 * 9, 3.0, 0.5)
  assert len(spans) == 4
  pieces = [signal[w.start_token * 480:(w.start_token + w.length // 320) * 480] for w in spans]
  offsets = [w.start_token * 480 for w in spans]
  joined = windows.crossfade_join(pieces, offsets)
  np.testing.assert_allclose(joined, signal[:len(joined)], rtol=0, atol=1e-6)
  assert len(joined) >= len(signal) - 480
  # one piece passes unchanged; two different constants cross over linearly, without a step
  np.testing.assert_array_equal(windows.crossfade_join([signal[:100]], [0]), signal[:100])
  ramp = windows.crossfade_join([np.zeros(300), np.ones(300)], [0, 200])
  assert ramp.shape == (500,) and (ramp[:200] == 0).all() and (ramp[300:] == 1).all()
  np.testing.assert_allclose(ramp[200:300], (np.arange(100) + 0.5) / 100, atol=1e-6)


def test_condition_features_one_waveform_and_batch_agree():
  from metis_jax.frontend import condition_features as cf
  from metis_jax.data import tokenizer as tokenizer_lib
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(16000).astype(np.float32), rng.standard_normal(12345).astype(np.float32)
  fa = cf.condition_features("cheap", a)
  assert fa.shape == (49, 160)  # the SSL token count of 1 s
  np.testing.assert_array_equal(cf.condition_features("log_mel", a), fa)  # an alias
  # the k-means tokenizer's own (JAX) features
  ref, _ = tokenizer_lib.features_jit(a[None], np.array([16000]))
  np.testing.assert_allclose(fa, np.asarray(ref)[0], atol=2e-3)
  batch = np.zeros((2, 16000), np.float32)
  batch[0], batch[1, :len(b)] = a, b
  feats, lengths = cf.condition_features("cheap", batch, np.array([16000, len(b)]))
  assert list(lengths) == [49, int(((len(b) - 400) // 160 + 2) // 2)]
  np.testing.assert_allclose(feats[0], fa, atol=1e-5)
  with pytest.raises(cf.ConditionFeatureError, match="w2v-BERT"):
    cf.condition_features("w2v_bert", a)
  with pytest.raises(cf.ConditionFeatureError, match="unknown condition feature"):
    cf.condition_features("mfcc", a)


def test_finetuned_models_load_from_released_files(parity_dir):
  d = os.path.join(parity_dir, "metis_ft_adapter_lora")
  m = model_loading.load_stage1(os.path.join(d, "base.safetensors"),
                                lora=os.path.join(d, "lora.safetensors"),
                                adapter=os.path.join(d, "adapter.safetensors"))
  assert (m.config.cond_feature_dim, m.config.adapter_gated) == (80, True) and "adapter" in m.params
  full = model_loading.load_stage1(os.path.join(parity_dir, "metis_ft_l2s", "weights.safetensors"))
  assert (full.config.cond_feature_dim, full.config.adapter_gated) == (768, False)
  with pytest.raises(FileNotFoundError, match="--lora"):
    model_loading.load_stage1(os.path.join(d, "base.safetensors"), lora="/nonexistent/l.safetensors")
