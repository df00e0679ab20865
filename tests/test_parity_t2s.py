"""The converted parity fixtures reproduce the original PyTorch code's outputs.

See ../shared/data/parity/README.md: small random-weight models in the
released key layout, with inputs and the original's outputs.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.inference import decoding
from metis_jax.models import masking, metis
from metis_jax.conversion import t2s

pytestmark = pytest.mark.parity


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _load(parity_dir, name):
  model_cfg, params = t2s.load_amphion(os.path.join(parity_dir, name, "weights.safetensors"))
  return model_cfg, metis.MetisModel(metis.MetisConfig.from_config(model_cfg)), params


@pytest.mark.parametrize("name", ["t2s_phones", "t2s_nophones"])
def test_forward_reproduces_original(parity_dir, name):
  model_cfg, model, params = _load(parity_dir, name)
  inputs = dict(np.load(os.path.join(parity_dir, name, "inputs.npz")))
  expected = dict(np.load(os.path.join(parity_dir, name, "outputs.npz")))
  assert model_cfg.use_phone_cond == (name == "t2s_phones")
  batch, length = inputs["x0"].shape
  kwargs = {}
  if model_cfg.use_phone_cond:
    kwargs = dict(phones=jnp.asarray(inputs["phone_id"]),
                  phone_valid=jnp.asarray(inputs["phone_mask"].astype(bool)))
    length += inputs["phone_id"].shape[1]
  # The original numbers every slot, padded phones included.
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  hidden, logits = model.apply(
      {"params": params}, jnp.asarray(inputs["x0"]), jnp.asarray(inputs["mask"].astype(bool)),
      jnp.asarray(inputs["x_mask"].astype(bool)), jnp.asarray(inputs["t"]), positions=positions,
      **kwargs)
  assert _rel(hidden, expected["hidden"]) < 1e-4
  assert _rel(logits, expected["logits"]) < 1e-4
  loss, _, count = masking.masked_cross_entropy(
      logits, jnp.asarray(inputs["x0"]), jnp.asarray(inputs["mask"] * inputs["x_mask"]))
  assert count == (inputs["mask"] * inputs["x_mask"]).sum()
  assert abs(float(loss) - float(expected["loss"])) / abs(float(expected["loss"])) < 1e-4


@pytest.mark.parametrize("name", ["t2s_phones", "t2s_nophones"])
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_decoder_reproduces_original_tokens(parity_dir, name, cfg):
  model_cfg, model, params = _load(parity_dir, name)
  inputs = dict(np.load(os.path.join(parity_dir, f"{name}_decode", "inputs.npz")))
  expected = np.load(os.path.join(parity_dir, f"{name}_decode", "outputs.npz"))[f"tokens_cfg{cfg}"]
  options = decoding.DecodeOptions(
      steps=int(inputs["n_timesteps"]), cfg=cfg, rescale_cfg=float(inputs["rescale_cfg"]),
      temperature=0.0, confidence_noise=0.0, top_k_ratio=1.0 - float(inputs["filter_thres"]))
  decoder = decoding.MetisDecoder(model, options)
  prompt = jnp.asarray(inputs["prompt"])
  target_len = int(inputs["target_len"])
  kwargs = {}
  if model_cfg.use_phone_cond:
    phones = jnp.asarray(inputs["phone_id"])
    kwargs = dict(phones=phones, phone_lengths=jnp.array([phones.shape[1]]))
  tokens = decoder(params, jax.random.key(0), prompt, jnp.array([prompt.shape[1]]),
                   jnp.array([target_len]), target_len=target_len, **kwargs)
  np.testing.assert_array_equal(np.asarray(tokens), expected)
