"""Released Metis fine-tunes (LoRA + adapter; the full L2S checkpoint) reproduce the original.

See ../shared/data/parity/README.md (`metis_ft_adapter_lora`, `metis_ft_l2s`).
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.conversion import common, finetune
from metis_jax.frontend import visual_features
from metis_jax.models import masking, metis
from tests.conftest import parity_fixture

pytestmark = pytest.mark.parity

LORA_FILES = ("base.safetensors", "lora.safetensors", "adapter.safetensors", "inputs.npz",
              "outputs.npz")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _lora_fixture():
  folder = parity_fixture("metis_ft_adapter_lora", *LORA_FILES)
  return folder, tuple(os.path.join(folder, f) for f in LORA_FILES[:3])


def _forward(model_cfg, params, inputs, features):
  """The fixture's forward (positions 0..T-1 on every row, as the original numbers them)."""
  model = metis.MetisModel(metis.MetisConfig.from_config(model_cfg))
  variables = {"params": params}
  batch, length = inputs["x0"].shape
  hidden, logits = model.apply(
      variables, jnp.asarray(inputs["x0"]), jnp.asarray(inputs["mask"].astype(bool)),
      jnp.asarray(inputs["x_mask"].astype(bool)), jnp.asarray(inputs["t"]),
      features=jnp.asarray(features), positions=jnp.broadcast_to(jnp.arange(length), (batch, length)))
  adapter_out = model.apply(variables, jnp.asarray(features), method=lambda m, f: m.adapter(f))
  loss, _, _ = masking.masked_cross_entropy(logits, jnp.asarray(inputs["x0"]),
                                            jnp.asarray(inputs["mask"] * inputs["x_mask"]))
  return adapter_out, hidden, logits, float(loss)


def _check(got, expected, suffix=""):
  adapter_out, hidden, logits, loss = got
  assert _rel(adapter_out, expected["adapter_out"]) < 1e-4
  assert _rel(hidden, expected["hidden" + suffix]) < 1e-4
  assert _rel(logits, expected["logits" + suffix]) < 1e-4
  assert abs(loss - float(expected["loss" + suffix])) / abs(float(expected["loss" + suffix])) < 1e-4


@pytest.mark.parametrize("merge", [False, True])
def test_lora_adapter_fine_tune_reproduces_original(merge):
  folder, (base, lora, adapter) = _lora_fixture()
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = dict(np.load(os.path.join(folder, "outputs.npz")))
  model_cfg, params = finetune.load_released(base, lora, adapter, merge=merge)
  assert model_cfg.cond_feature_dim == 80 and model_cfg.adapter_gated
  assert model_cfg.num_heads == 4  # from the base file's metadata
  if merge:
    assert model_cfg.lora_rank == 0
    assert "lora_a" not in str(params)
  else:
    assert (model_cfg.lora_rank, model_cfg.lora_alpha) == (4, 8.0)
    assert model_cfg.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj")
  _check(_forward(model_cfg, params, inputs, inputs["cond_feat"]), expected,
         "_merged" if merge else "")


def test_the_lora_and_the_adapter_both_matter():
  """Without the LoRA (or with the gate at 0) the fixture's hidden states are far off."""
  folder, (base, lora, adapter) = _lora_fixture()
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = dict(np.load(os.path.join(folder, "outputs.npz")))
  model_cfg, params = finetune.load_released(base, None, adapter)
  assert _rel(_forward(model_cfg, params, inputs, inputs["cond_feat"])[1], expected["hidden"]) > 0.1
  model_cfg, params = finetune.load_released(base, lora, adapter)
  params["adapter"]["gate_scale"] = np.zeros((), np.float32)
  assert _rel(_forward(model_cfg, params, inputs, inputs["cond_feat"])[1], expected["hidden"]) > 0.1


def test_l2s_full_checkpoint_reproduces_original():
  folder = parity_fixture("metis_ft_l2s", "weights.safetensors", "inputs.npz", "outputs.npz")
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = dict(np.load(os.path.join(folder, "outputs.npz")))
  model_cfg, params = finetune.load_full(os.path.join(folder, "weights.safetensors"))
  assert model_cfg.cond_feature_dim == 768 and not model_cfg.adapter_gated
  assert model_cfg.lora_rank == 0
  cond_feat = visual_features.upsample_x2(inputs["video_feat"])
  assert cond_feat.shape == expected["cond_feat"].shape
  assert _rel(cond_feat, expected["cond_feat"]) < 1e-6
  _check(_forward(model_cfg, params, inputs, cond_feat), expected)


def test_l2s_decode_condition_pads_the_prompt_with_zeros():
  folder = parity_fixture("metis_ft_l2s_decode", "inputs.npz", "outputs.npz")
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = np.load(os.path.join(folder, "outputs.npz"))["cond_feat"]
  prompt_len = inputs["prompt"].shape[1]
  cond = visual_features.l2s_condition(inputs["video_feat"][None], prompt_len)
  assert cond.shape == expected.shape
  np.testing.assert_array_equal(np.asarray(cond[:, :prompt_len]), 0.0)
  assert _rel(cond, expected) < 1e-6


def _assert_same_file(written, original):
  back, _ = common.load_safetensors(written)
  source, _ = common.load_safetensors(original)
  assert set(back) == set(source)
  for k in source:
    np.testing.assert_array_equal(back[k], source[k], err_msg=k)


@pytest.mark.parametrize("scan", [True, False])
def test_released_files_round_trip_exactly(tmp_path, scan):
  _, files = _lora_fixture()
  model_cfg, params = finetune.load_released(*files, merge=False, scan_layers=scan)
  out = [str(tmp_path / f) for f in ("base.safetensors", "lora.safetensors", "adapter.safetensors")]
  finetune.save_released(out[0], params, model_cfg, lora_path=out[1], adapter_path=out[2])
  for written, original in zip(out, files):
    _assert_same_file(written, original)


def test_full_checkpoint_round_trips_exactly(tmp_path):
  source = os.path.join(parity_fixture("metis_ft_l2s", "weights.safetensors"), "weights.safetensors")
  model_cfg, params = finetune.load_full(source)
  finetune.save_full(str(tmp_path / "l2s.safetensors"), params, model_cfg)
  _assert_same_file(str(tmp_path / "l2s.safetensors"), source)


def _write_broken_lora(src: str, dst: str) -> None:
  tensors, meta = common.load_safetensors(src)
  del tensors["model.diff_estimator.layers.1.mlp.up_proj.lora_B.default.weight"]
  tensors["model.diff_estimator.layers.2.self_attn.q_proj.lora_A.default.weight"] = np.zeros(
      (4, 64), np.float32)
  tensors["model.diff_estimator.layers.0.self_attn.k_proj.lora_A.default.weight"] = np.zeros(
      (4, 65), np.float32)
  common.save_safetensors(dst, tensors, meta)


def test_mismatched_lora_file_is_refused_with_the_keys(tmp_path):
  _, (base, lora, adapter) = _lora_fixture()
  bad = str(tmp_path / "lora.safetensors")
  _write_broken_lora(lora, bad)
  with pytest.raises(common.ConversionError) as e:
    finetune.load_released(base, bad, adapter)
  message = str(e.value)
  assert bad in message
  assert "missing keys (1)" in message and "layers.1.mlp.up_proj.lora_B" in message
  assert "unexpected keys (1)" in message and "layers.2.self_attn.q_proj.lora_A" in message
  assert "mis-shaped keys (1)" in message and "layers.0.self_attn.k_proj.lora_A" in message
  assert "file (4, 65), model (4, 64)" in message


def test_mismatched_adapter_file_is_refused_with_the_keys(tmp_path):
  _, (base, lora, adapter) = _lora_fixture()
  tensors, meta = common.load_safetensors(adapter)
  tensors["model.cond_adapter.out_linear.weight"] = np.zeros((32, 256), np.float32)  # width 32, base 64
  del tensors["model.cond_adapter.gate_scale"]
  tensors["cond_adapter.in_linear.weight"] = tensors["model.cond_adapter.in_linear.weight"]
  bad = str(tmp_path / "adapter.safetensors")
  common.save_safetensors(bad, tensors, meta)
  with pytest.raises(common.ConversionError) as e:
    finetune.load_released(base, lora, bad)
  message = str(e.value)
  assert "missing keys (1)" in message and "model.cond_adapter.gate_scale" in message
  assert "unexpected keys (1)" in message and "  cond_adapter.in_linear.weight" in message
  assert "model.cond_adapter.out_linear.weight: file (32, 256), model (64, 256)" in message


def test_a_file_that_is_no_lora_and_a_full_checkpoint_as_base_are_refused():
  _, (base, _, adapter) = _lora_fixture()
  with pytest.raises(common.ConversionError, match="no LoRA keys"):
    finetune.load_released(base, adapter)
  l2s = os.path.join(parity_fixture("metis_ft_l2s", "weights.safetensors"), "weights.safetensors")
  with pytest.raises(common.ConversionError, match="full fine-tuned checkpoint"):
    finetune.load_released(l2s)


@pytest.mark.slow
def test_cli_converts_released_fine_tune_and_writes_it_back(tmp_path):
  _, (base, lora, adapter) = _lora_fixture()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "metis_jax.convert", *args], env=env,
                                     capture_output=True, text=True)
  done = run("--input", base, "--lora", lora, "--adapter", adapter, "--nomerge_lora",
             "--output", str(tmp_path / "conv"))
  assert done.returncode == 0, done.stderr
  assert "LoRA r=4 unmerged" in done.stdout and "adapter c=80" in done.stdout
  out = [str(tmp_path / f) for f in ("b.safetensors", "l.safetensors", "a.safetensors")]
  done = run("--reverse", "--input", str(tmp_path / "conv"), "--output", out[0], "--lora", out[1],
             "--adapter", out[2])
  assert done.returncode == 0, done.stderr
  for written, original in zip(out, (base, lora, adapter)):
    _assert_same_file(written, original)
  bad = str(tmp_path / "bad_lora.safetensors")
  _write_broken_lora(lora, bad)
  done = run("--input", base, "--lora", bad, "--output", str(tmp_path / "bad"))
  assert done.returncode == 2
  assert done.stderr.startswith("error: ") and "layers.1.mlp.up_proj.lora_B" in done.stderr
