"""S2A through the training engine: synthetic training, exact resume, acoustic batches, AOT,
and held-out masked accuracy on the demo corpus."""

import json
import os
import time

import jax
import numpy as np
import pytest

from metis_jax.training import checkpointing
from metis_jax import config_lib
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import metrics
from metis_jax.training import loop as train
from metis_jax.training import aot_compile as train_compile
from metis_jax.training import evaluate as train_eval
from metis_jax.training import state as train_state
from metis_jax.training import step as train_step
from metis_jax.data import pipeline
from metis_jax.data import records
from metis_jax.data import shards
from metis_jax.data import synthetic

# Hidden 32, 2 layers, 4 codec layers of 32 codes conditioned on 64 SSL codes,
# 8 sequences of 16 frames.
S2A_TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.vocab_size=32",
    "model.cond_vocab_size=64", "model.num_quantizers=4", "train.seq_length=16",
    "train.global_batch_size=8", "train.warmup_steps=2", "train.learning_rate=1e-2",
    "train.synthetic_data=True", "logging.log_every_steps=1", "logging.tensorboard=False",
    "mesh.fsdp=-1",
]


def s2a_config(*overrides: str, name: str = "s2a_tiny"):
  return config_lib.load_config(name, S2A_TINY + list(overrides))


def read_metrics(workdir: str) -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {int(v["step"]): v for v in map(json.loads, f)}


RUN = ("train.steps=40",)  # every engine run below shares this, so they share compilations
# (the session's persistent compilation cache, tests/conftest.py)


@pytest.mark.slow
def test_engine_trains_tiny_s2a_on_synthetic_data(tmp_path):
  config = s2a_config(*RUN, "checkpoint.enabled=False")
  result = train.train(config, str(tmp_path), return_state=True)
  assert result.final_step == 40 and int(result.state.skipped_steps) == 0
  losses = [h["loss"] for h in result.history]
  # ln(32) = 3.47 at the start; the codes are a function of the SSL token (10% noise).
  assert losses[0] > 3.0 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  assert np.mean([h["accuracy"] for h in result.history[-5:]]) > 5 / 32
  layers = {h["target_layer"] for h in result.history}
  assert layers <= {1.0, 2.0, 3.0} and len(layers) > 1  # the full model never trains layer 0
  assert all(h["scored_tokens"] > 0 for h in result.history)
  logged = read_metrics(str(tmp_path))
  assert sorted(logged) == list(range(1, 41)) and "tokens_per_second" in logged[40]
  assert "acoustic_tokens" in input_pipeline.batch_spec(config)
  assert input_pipeline.batch_spec(config)["acoustic_tokens"].shape == (8, 16, 4)


def _steps(config, num_devices: int, steps: int = 2):
  """Losses and target layers of `steps` S2A steps on `num_devices` (the engine's pieces)."""
  setup = train_state.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:num_devices])
  state = train_state.create_sharded_state(setup, mesh, config.seed)
  step_fn = train_step.jit_train_step(setup, config, mesh, train_state.state_shardings(setup, mesh),
                                      input_pipeline.batch_spec(config))
  data = input_pipeline.make_train_iterator(config, mesh, 0, 1)
  out = []
  for _ in range(steps):
    state, metrics = step_fn(state, next(data))
    out.append((float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["target_layer"])))
  return out


@pytest.mark.slow
def test_microbatches_share_the_target_layer_and_match_one_batch():
  one = _steps(s2a_config(*RUN), 8)
  accum = _steps(s2a_config(*RUN, "train.grad_accum_steps=2", "mesh.fsdp=1"), 1)
  for (loss_a, gnorm_a, layer_a), (loss_b, gnorm_b, layer_b) in zip(one, accum):
    assert layer_a == layer_b
    assert abs(loss_a - loss_b) < 1e-5 and abs(gnorm_a - gnorm_b) < 1e-5 * max(1.0, gnorm_a)


@pytest.fixture(scope="module")
def acoustic_shards(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("acoustic"))
  synthetic.write_token_shards(out, 40, 2, min_tokens=20, max_tokens=60, vocab_size=64, seed=3,
                               acoustic_layers=12, acoustic_codebook_size=32)
  return out


@pytest.mark.slow
def test_checkpoint_resume_gives_the_uninterrupted_run(tmp_path, acoustic_shards, monkeypatch):
  overrides = RUN + ("train.synthetic_data=False", f"data.train_sources=('{acoustic_shards}',)",
                     "data.num_workers=0", "data.min_length=8", "data.bucket_lengths=(16,)",
                     "checkpoint.every_steps=20")
  whole = train.train(s2a_config(*overrides), str(tmp_path / "whole"))
  workdir = str(tmp_path / "resumed")
  with monkeypatch.context() as m:  # as if SIGTERM arrived during step 10
    m.setattr(checkpointing.PreemptionWatcher, "reached", lambda self, step: step == 10)
    first = train.train(s2a_config(*overrides), workdir)
  assert first.preempted and first.final_step == 10
  second = train.train(s2a_config(*overrides), workdir)
  assert second.start_step == 10 and second.final_step == 40
  key = lambda h: (h["loss"], h["grad_norm"], h["target_layer"], h["valid_tokens"])
  # Exact: the same parameters, optimizer state, masks, target layers and Grain batches.
  assert {h["step"]: key(h) for h in first.history + second.history} == \
      {h["step"]: key(h) for h in whole.history}


def test_pipeline_batches_carry_aligned_acoustic_tokens(acoustic_shards):
  config = s2a_config("train.synthetic_data=False", f"data.train_sources=('{acoustic_shards}',)",
                      "data.num_workers=0", "data.min_length=8", "data.bucket_lengths=(8, 16)")
  it = pipeline.make_local_iterator(config, 0, 1)
  for _ in range(6):
    batch = next(it)
    tokens, valid, codes = batch["tokens"], batch["valid"], batch["acoustic_tokens"]
    assert tokens.shape[0] == 8 and tokens.shape[1] in (8, 16)
    assert codes.shape == tokens.shape + (4,) and codes.dtype == np.int32  # model.num_quantizers
    expected = (tokens[..., None] + 7 * np.arange(4)) % 32  # synthetic.acoustic_for: frame-aligned
    np.testing.assert_array_equal(np.where(valid[..., None], expected, 0), codes)
  it.close()
  # Record 0 has one codec frame more than SSL tokens: it is cut, never shifted in.
  raw = shards.read_all(shards.list_shards(acoustic_shards))[0]
  assert len(records.decode(raw)["acoustic_tokens"]) == len(records.decode(raw)["ssl_tokens"]) + 1
  elem = pipeline.decode_element(raw, acoustic_layers=12)
  np.testing.assert_array_equal(elem["acoustic_tokens"], records.decode(raw)["acoustic_tokens"][:-1])
  one_layer = s2a_config("train.synthetic_data=False", f"data.train_sources=('{acoustic_shards}',)",
                         "data.num_workers=0", "data.min_length=8", "data.bucket_lengths=(8, 16)",
                         "model.num_quantizers=1", "model.predicts_first_layer=True")
  it = pipeline.make_local_iterator(one_layer, 0, 1)
  assert next(it)["acoustic_tokens"].shape[2] == 1
  it.close()


def test_records_without_acoustic_tokens_are_a_clear_error(tmp_path):
  plain = str(tmp_path / "plain")
  synthetic.write_token_shards(plain, 10, 1, min_tokens=20, max_tokens=40, vocab_size=64)
  config = s2a_config("train.synthetic_data=False", f"data.train_sources=('{plain}',)",
                      "data.num_workers=0", "data.min_length=8", "data.bucket_lengths=(16,)")
  with pytest.raises(pipeline.MissingAcousticTokens, match=f"of source '{plain}' has no acoustic tokens"):
    pipeline.make_local_iterator(config, 0, 1)


def test_s2a_flops_count_the_frame_condition_and_one_head():
  config = config_lib.load_config("s2a_full")
  h, m, t = 1024, 4096, config.train.seq_length
  per_layer = 4 * h * h + 3 * h * m + 2 * t * h
  assert metrics.training_flops_per_token(config.model, t) == 3 * 2 * (16 * per_layer + h * 1024 + 2 * h * m)


@pytest.mark.slow
def test_aot_dry_run_compiles_the_s2a_step():
  report = train_compile.dry_run(s2a_config(*RUN), "cpu-8")
  assert report.fits and report.mesh.startswith("data=1 fsdp=8 tensor=1")
  assert report.num_params == _num_params(s2a_config(*RUN))


def _num_params(config) -> int:
  setup = train_state.make_setup(config)
  shapes = jax.eval_shape(train_state.init_fn(setup, 0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params))


# Held-out accuracy: the tiny 1-layer model (codec layer 0 from SSL tokens) on the demo corpus,
# shortened for CI (narrower, smaller vocabularies, 100 steps: about 40 s on 2 cores). The
# full-size tiny run: python -m metis_jax.train --config configs/s2a_tiny_1layer.py --workdir W
# && python -m metis_jax.train_eval --config configs/s2a_tiny_1layer.py --workdir W
HELDOUT_RUN = ["model.hidden_size=64", "model.vocab_size=64", "model.cond_vocab_size=256",
               "data.kmeans_clusters=256", "data.kmeans_iterations=8", "train.steps=100",
               "train.warmup_steps=15", "train.learning_rate=4e-3", "logging.log_every_steps=50",
               "checkpoint.enabled=False", "logging.tensorboard=False"]


@pytest.mark.slow
def test_tiny_s2a_on_the_demo_corpus_beats_chance_and_the_majority_code(tmp_path):
  started = time.perf_counter()
  config = config_lib.load_config("s2a_tiny_1layer", HELDOUT_RUN)
  result = train.train(config, str(tmp_path), return_state=True)
  report = train_eval.run(config, str(tmp_path), params=result.state.params, repeats=2)
  print("\n".join(report.lines()), f"\n({time.perf_counter() - started:.0f} s)")
  assert report.utterances == 12 and [s.layer for s in report.layers] == [0]
  assert report.layers[0].scored > 1000
  # Chance is 1/64; the most frequent training code scores about 0.045; this run about 0.5.
  assert report.accuracy > 10 * report.chance, report.lines()
  assert report.accuracy > 4 * report.majority_accuracy, report.lines()
