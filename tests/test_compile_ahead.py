"""Every bucket's train step compiled before the first step; the dry run compiles every bucket;
the gradient clip reuses the step's global norm."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.data import synthetic
from metis_jax.training import aot_compile
from metis_jax.training import compile_ahead
from metis_jax.training import input_pipeline
from metis_jax.training import loop
from metis_jax.training import state as train_state
from metis_jax.training import step as step_lib
from metis_jax.parallel import mesh as mesh_lib
from tests import train_testlib as lib


def _toy_step():
  traces = []

  def step(state, batch):
    traces.append(batch["x"].shape)
    return state + batch["x"].sum(), {"mean": batch["x"].mean()}

  return jax.jit(step), traces


def _spec(rows, length):
  return {"x": jax.ShapeDtypeStruct((rows, length), jnp.float32)}


def test_every_spec_compiles_ahead_and_steps_never_trace():
  jitted, traces = _toy_step()
  ahead = compile_ahead.compile_ahead(jitted, jnp.zeros(()), [_spec(2, 4), _spec(2, 8), _spec(2, 4)])
  assert sorted(traces) == [(2, 4), (2, 8)]  # the duplicate spec is compiled once
  assert [b.shape for b in ahead.buckets] == ["[2, 4]", "[2, 8]"]
  state = jnp.zeros(())
  for length in (8, 4, 8):
    x = np.arange(2 * length, dtype=np.float32).reshape(2, length)
    state, metrics = ahead(state, {"x": x})
    assert float(metrics["mean"]) == x.mean()
  assert float(state) == 2 * np.arange(16).sum() + np.arange(8).sum()
  assert len(traces) == 2 and ahead.late_compiles == 0 and jitted._cache_size() == 0


def test_a_shape_not_compiled_ahead_is_compiled_once_with_a_warning():
  jitted, traces = _toy_step()
  ahead = compile_ahead.compile_ahead(jitted, jnp.zeros(()), [_spec(2, 4)])
  for _ in range(2):
    state, _ = ahead(jnp.zeros(()), {"x": np.ones((2, 3), np.float32)})
  assert float(state) == 6.0 and ahead.late_compiles == 1 and len(traces) == 2


def test_configured_batch_specs_list_every_bucket_without_reading_data():
  config = lib.tiny_config("train.synthetic_data=False", "data.train_sources=('/nonexistent',)",
                           "data.bucket_lengths=(4, 12, 16)")
  assert [s["tokens"].shape for s in input_pipeline.configured_batch_specs(config)] == [(8, 4), (8, 12), (8, 16)]
  default = lib.tiny_config("train.synthetic_data=False", "data.bucket_lengths=()")
  assert [s["valid"].shape[1] for s in input_pipeline.configured_batch_specs(default)] == [4, 8, 12, 16]
  assert [s["tokens"].shape for s in input_pipeline.configured_batch_specs(lib.tiny_config())] == [(8, 16)]


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tokens"))
  synthetic.write_token_shards(out, 60, 2, min_tokens=4, max_tokens=40, vocab_size=64, seed=3)
  return out


BUCKETED = ("train.synthetic_data=False", "data.num_workers=0", "data.min_length=4", "data.bucket_lengths=(8, 16)",
            "checkpoint.enabled=False", "train.steps=6", "model.num_layers=1")


@pytest.mark.slow
def test_training_with_two_buckets_compiles_both_before_the_first_step(tmp_path, token_shards):
  config = lib.tiny_config(*BUCKETED, f"data.train_sources=('{token_shards}',)")
  devices = jax.devices()[:1]
  result = loop.train(config, str(tmp_path / "run"), devices=devices)
  steps, = loop._STEPS_CACHE.values()
  ahead = steps.step_fn
  assert [b.shape for b in ahead.buckets] == ["[8, 8]", "[8, 16]"] and all(b.memory["total"] > 0 for b in ahead.buckets)
  # No step compiled: no late compile, and the jitted function itself never ran.
  assert ahead.late_compiles == 0 and ahead.jitted._cache_size() == 0
  # The same losses as the plain jitted step on the same batches (both lengths occur).
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  objective = loop.make_objective(config)
  setup = train_state.make_setup(config)
  state = objective.create_state(mesh, config.seed)
  jitted = step_lib.jit_train_step(setup, config, mesh, objective.state_shardings(mesh), objective.batch_spec())
  data, lengths, losses = objective.data_iterator(config, mesh), set(), []
  for _ in range(config.train.steps):
    batch = next(data)
    lengths.add(batch["tokens"].shape[1])
    state, metrics = jitted(state, batch)
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  data.close()
  assert lengths == {8, 16}
  np.testing.assert_allclose([(h["loss"], h["grad_norm"]) for h in result.history], losses, rtol=1e-6)


@pytest.mark.slow
def test_dry_run_compiles_every_bucket_and_fails_when_the_largest_does_not_fit(tmp_path):
  overrides = lib.cli_overrides("train.synthetic_data=False", "data.bucket_lengths=(8, 16)", "model.num_layers=1")
  fits = _compile_cli(str(tmp_path), "--topology", "cpu-8", *overrides)
  assert fits.returncode == 0, fits.stderr[-3000:]
  assert "compiled 2 batch shape(s)" in fits.stdout
  assert "  [8, 8] " in fits.stdout and "  [8, 16] " in fits.stdout
  assert "at the largest, [8, 16]:" in fits.stdout and "-> fits" in fits.stdout
  too_big = _compile_cli(str(tmp_path), "--topology", "cpu-8", "--hbm_gib", str(1 / 1024 / 16), *overrides)
  assert too_big.returncode == 1 and "DOES NOT FIT" in too_big.stdout
  assert "at its largest batch [8, 16], more than the 64.0 KiB" in too_big.stderr


def _compile_cli(cache_dir, *args):
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  command = [sys.executable, "-m", "metis_jax.train_compile", "--config",
             os.path.join(lib.REPO_ROOT, "configs", "tiny.py")] + list(args)
  env = lib.subprocess_env(devices=1, cache_dir=cache_dir)
  env.pop("XLA_FLAGS")  # the CLI sets the fake device count itself (--topology cpu-8)
  return subprocess.run(command, cwd=lib.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("config_name, overrides", [
    ("s2a.py:tiny", ("data.bucket_lengths=(16,)",)),
    ("finetune_tiny.py:tts", ("data.bucket_lengths=(16,)",)),
])
def test_dry_run_takes_s2a_and_finetune_configs(config_name, overrides):
  from metis_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(os.path.join(lib.REPO_ROOT, "configs", config_name), list(overrides) + [
      "train.global_batch_size=8", "train.seq_length=16", "model.num_layers=1", "mesh.fsdp=-1"])
  report = aot_compile.dry_run(config, "cpu-8")
  # (Several buckets: the stage-1 test above; fine-tune batches have one length.)
  assert len(report.buckets) == 1 and report.fits and report.memory["total"] > 0
  assert report.largest.shape == "[8, 16]"


def test_abstract_encoder_matches_the_encoder_a_run_creates():
  """The fine-tune dry run's stand-in for the frozen w2v-BERT: same tree, shapes, dtypes, shardings."""
  from metis_jax import config_lib  # pylint: disable=import-outside-toplevel
  from metis_jax.training import codec_state  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(os.path.join(lib.REPO_ROOT, "configs", "finetune_tiny.py:se"), [
      "features.source=random_w2v_bert", "features.hidden_size=32", "features.output_layer=1",
      "features.num_heads=2", "features.intermediate_size=64", "mesh.fsdp=-1"])
  enc_cfg = codec_state.encoder_config(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config)
  abstract = codec_state.abstract_encoder(enc_cfg, mesh, rules)
  setup = type("Setup", (), dict(encoder=enc_cfg, rules=rules))
  real = codec_state.create_encoder(setup, config, mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype) == (r.shape, r.dtype)
    assert a.sharding.is_equivalent_to(r.sharding, len(a.shape))
  assert np.prod(abstract.mean.shape) == 32
