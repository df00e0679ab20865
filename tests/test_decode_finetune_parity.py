"""Decoding of the fine-tuned models (SE, TSE / VC, L2S) reproduces the original's tokens.

Fixtures `metis_ft_adapter_lora_decode` and `metis_ft_l2s_decode` (see
../shared/data/parity/README.md): the original decoded with its Gumbel noise
zeroed, so temperature 0 and confidence noise 0 give the same tokens. The
conditions go through the task path the command line uses: a `Job` whose
chunk holds the condition frames (`tasks.l2s_condition` for L2S), the
stage-1 item `cli._stage1_item` makes of it, the padded batch of
`engine.stage1_arrays` and the call `engine.stage1_call` (the engine's
jitted function, here without a mesh).
"""

import json
import os

import jax
import numpy as np
import pytest

from metis_jax.conversion import common, t2s
from metis_jax.inference import cli, decoding, engine, tasks
from metis_jax.models import metis

pytestmark = pytest.mark.parity

PADDED = (50, 50)  # the prompt / target slots as the engine pads them (token_quantum 50)


def _adapter_params(tensors, prefix, gated):
  """Amphion adapter Linears `[out, in]` -> ConditionAdapter params."""
  names = (("in_linear", "out_linear") if gated else ("0", "2"))
  out = {}
  for ours, theirs in zip(("in_linear", "out_linear"), names):
    out[ours] = {"kernel": np.asarray(tensors[f"{prefix}{theirs}.weight"], np.float32).T,
                 "bias": np.asarray(tensors[f"{prefix}{theirs}.bias"], np.float32)}
  if gated:
    out["gate_scale"] = np.asarray(tensors[f"{prefix}gate_scale"], np.float32).reshape(())
  return out


def _merged_lora_model(folder):
  """Base + LoRA (merged: W + (alpha / r) B A on `[out, in]`) + gated adapter, built here from the
  three released-layout files (independent of conversion.finetune)."""
  with open(os.path.join(folder, "config.json")) as f:
    meta = json.load(f)
  base, metadata = common.load_safetensors(os.path.join(folder, "base.safetensors"))
  lora, _ = common.load_safetensors(os.path.join(folder, "lora.safetensors"))
  adapter, _ = common.load_safetensors(os.path.join(folder, "adapter.safetensors"))
  scale = meta["lora_alpha"] / meta["lora_r"]
  merged = dict(base)
  a_keys = [k for k in lora if ".lora_A." in k]
  assert len(a_keys) == 7 * meta["num_layers"]
  for key in a_keys:
    target = key[len("model."):].replace(".lora_A.default.weight", ".weight")
    b = lora[key.replace(".lora_A.", ".lora_B.")]
    merged[target] = base[target].astype(np.float64) + scale * (b.astype(np.float64) @ lora[key])
    merged[target] = merged[target].astype(np.float32)
  model = t2s.infer_model_config(merged, metadata, meta["num_heads"])
  params = t2s.amphion_to_params(merged, model)
  model.cond_feature_dim, model.adapter_gated = meta["cond_dim"], True
  params["adapter"] = _adapter_params(adapter, "model.cond_adapter.", gated=True)
  return model, params


def _l2s_model(folder):
  with open(os.path.join(folder, "config.json")) as f:
    meta = json.load(f)
  tensors, metadata = common.load_safetensors(os.path.join(folder, "weights.safetensors"))
  adapter = {k: tensors.pop(k) for k in list(tensors) if k.startswith("cond_adapter.")}
  model = t2s.infer_model_config(tensors, metadata, meta["num_heads"])
  params = t2s.amphion_to_params(tensors, model)
  model.cond_feature_dim, model.adapter_gated = meta["cond_dim"], False
  params["adapter"] = _adapter_params(adapter, "cond_adapter.", gated=False)
  return model, params


def _load(parity_dir, kind):
  """(model config, params): through conversion.finetune when it is there, else built here."""
  try:
    from metis_jax.conversion import finetune  # pylint: disable=g-import-not-at-top
  except ImportError:
    finetune = None
  if kind == "lora":
    folder = os.path.join(parity_dir, "metis_ft_adapter_lora")
    if finetune is not None:
      return finetune.load_released(os.path.join(folder, "base.safetensors"),
                                    lora_path=os.path.join(folder, "lora.safetensors"),
                                    adapter_path=os.path.join(folder, "adapter.safetensors"))
    return _merged_lora_model(folder)
  folder = os.path.join(parity_dir, "metis_ft_l2s")
  if finetune is not None:
    return finetune.load_full(os.path.join(folder, "weights.safetensors"))
  return _l2s_model(folder)


class _Engine:
  uses_phones = False


def _decode_job(model_cfg, params, inputs, job, cfg):
  """The job's only chunk through the CLI's stage-1 path; -> `[target]` tokens."""
  options = decoding.DecodeOptions(
      steps=int(inputs["n_timesteps"]), cfg=cfg, rescale_cfg=float(inputs["rescale_cfg"]),
      temperature=0.0, confidence_noise=0.0, top_k_ratio=1.0 - float(inputs["filter_thres"]))
  model = metis.MetisModel(metis.MetisConfig.from_config(model_cfg))
  decoder = decoding.MetisDecoder(model, options)
  keys = lambda stream, r=0: jax.random.key(0)
  item = cli._stage1_item(job, 0, "original", _Engine(), keys)
  raw_keys = np.asarray(jax.random.key_data(item.key))[None]
  arrays = engine.stage1_arrays([item], PADDED + (0,), 1, False, model.config.cond_feature_dim, raw_keys)
  fn = engine.stage1_call(decoder, PADDED[1], phones=False, features=True)
  tokens = np.asarray(fn(params, *arrays))
  return tokens[0, :item.target_len]


def _job(task, prompt, features, tokens):
  ex = tasks.Example(0, "x", {}, "x.wav")
  job = tasks.Job(ex, task, [tasks.Chunk(tokens=tokens, features=features)], independent_chunks=True)
  job.prompt_semantic = np.asarray(prompt, np.int32)
  return job


@pytest.fixture(scope="module")
def lora_model():
  from tests import conftest  # pylint: disable=g-import-not-at-top
  return _load(conftest.require_dir(conftest.PARITY), "lora")


@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_se_decoding_reproduces_original_tokens(parity_dir, lora_model, cfg):
  folder = os.path.join(parity_dir, "metis_ft_adapter_lora_decode")
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = np.load(os.path.join(folder, "outputs.npz"))[f"se_tokens_cfg{cfg}"][0]
  cond = inputs["se_cond_feat"][0]  # no prompt: the condition covers the target
  job = _job("se", np.zeros((0,), np.int32), cond, len(cond))
  np.testing.assert_array_equal(_decode_job(*lora_model, inputs, job, cfg), expected)


@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_tse_vc_decoding_reproduces_original_tokens(parity_dir, lora_model, cfg):
  folder = os.path.join(parity_dir, "metis_ft_adapter_lora_decode")
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = np.load(os.path.join(folder, "outputs.npz"))[f"tse_tokens_cfg{cfg}"][0]
  prompt, cond = inputs["tse_prompt"][0], inputs["tse_cond_feat"][0]  # cond over [prompt; target]
  job = _job("tse", prompt, cond, len(cond) - len(prompt))
  tokens = _decode_job(*lora_model, inputs, job, cfg)
  assert len(tokens) == 30
  np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_l2s_condition_and_decoding_reproduce_the_original(parity_dir, cfg):
  folder = os.path.join(parity_dir, "metis_ft_l2s_decode")
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  outputs = np.load(os.path.join(folder, "outputs.npz"))
  prompt = inputs["prompt"][0]
  cond = tasks.l2s_condition(inputs["video_feat"], len(prompt))
  np.testing.assert_allclose(cond, outputs["cond_feat"][0], rtol=0, atol=1e-6)
  job = _job("l2s", prompt, cond, len(cond) - len(prompt))
  np.testing.assert_array_equal(_decode_job(*_load(parity_dir, "l2s"), inputs, job, cfg),
                                outputs[f"tokens_cfg{cfg}"][0])


def test_the_condition_matters(parity_dir, lora_model):
  """Guard against a test that passes whatever the condition: other frames, other tokens."""
  folder = os.path.join(parity_dir, "metis_ft_adapter_lora_decode")
  inputs = dict(np.load(os.path.join(folder, "inputs.npz")))
  expected = np.load(os.path.join(folder, "outputs.npz"))["tse_tokens_cfg2.5"][0]
  prompt, cond = inputs["tse_prompt"][0], inputs["tse_cond_feat"][0]
  job = _job("tse", prompt, cond[::-1].copy(), len(cond) - len(prompt))
  assert not np.array_equal(_decode_job(*lora_model, inputs, job, 2.5), expected)
