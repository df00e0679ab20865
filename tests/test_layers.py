"""Backbone layers against their formulas and against transformers' Llama layer.

The Llama comparisons read the frozen fixture `../shared/data/parity/hf_llama_layer`
(transformers 4.41.2's `LlamaDecoderLayer` and rotary tables, see its README); with
torch and transformers installed, the same comparison also runs live.
"""

import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from safetensors.numpy import load_file

from metis_jax.nn import attention, embeddings, norms, rope, transformer
from tests import conftest

HIDDEN, HEADS, HEAD_DIM = 64, 4, 16


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope="module")
def llama_fixture():
  """(weights in Hugging Face names `[out, in]`, inputs, outputs) of `hf_llama_layer`."""
  d = conftest.parity_fixture("hf_llama_layer", "weights.safetensors", "inputs.npz", "outputs.npz")
  return (load_file(os.path.join(d, "weights.safetensors")), dict(np.load(os.path.join(d, "inputs.npz"))),
          dict(np.load(os.path.join(d, "outputs.npz"))))


def _block_params(sd, hidden=HIDDEN, heads=HEADS):
  """A Llama layer's state dict -> `TransformerBlock` params (a constant-gain AdaRMSNorm)."""
  d = hidden // heads
  # AdaRMSNorm with W = 0 and b = RMSNorm weight is exactly Llama's RMSNorm.
  norm = lambda w: {"to_weight": {"kernel": np.zeros((hidden, hidden), np.float32), "bias": w}}
  return {
      "input_norm": norm(sd["input_layernorm.weight"]),
      "post_attention_norm": norm(sd["post_attention_layernorm.weight"]),
      "attention": {
          "query": {"kernel": sd["self_attn.q_proj.weight"].T.reshape(hidden, heads, d)},
          "key": {"kernel": sd["self_attn.k_proj.weight"].T.reshape(hidden, heads, d)},
          "value": {"kernel": sd["self_attn.v_proj.weight"].T.reshape(hidden, heads, d)},
          "out": {"kernel": sd["self_attn.o_proj.weight"].T.reshape(heads, d, hidden)},
      },
      "mlp": {n: {"kernel": sd[f"mlp.{n}_proj.weight"].T} for n in ("gate", "up", "down")},
  }


def _our_block(sd, x, valid, positions):
  """`[batch, length, 64]` output of our block (zero condition) on the fixture layout."""
  cfg = transformer.BackboneConfig(hidden_size=HIDDEN, num_layers=1, num_heads=HEADS)
  cond = jnp.zeros((x.shape[0], HIDDEN), jnp.float32)
  out, _ = transformer.TransformerBlock(cfg).apply(
      {"params": _block_params(sd)}, jnp.asarray(x), cond, jnp.asarray(positions),
      attention.attention_mask(jnp.asarray(valid)))
  return np.asarray(out)


@pytest.mark.parity
def test_block_matches_llama_layer_fixture_bidirectional_with_padding(llama_fixture):
  sd, inputs, expected = llama_fixture
  valid = inputs["valid"].astype(bool)
  np.testing.assert_array_equal(valid.sum(-1), inputs["lengths"])
  # The additive mask the layer saw is our boolean key mask (padding keys -> float32 min).
  ours_additive = np.where(np.asarray(attention.attention_mask(jnp.asarray(valid))), 0.0,
                           np.finfo(np.float32).min)
  np.testing.assert_array_equal(np.broadcast_to(ours_additive, inputs["attention_mask"].shape),
                                inputs["attention_mask"])
  ours = _our_block(sd, inputs["hidden_states"], valid, inputs["positions"])
  # Every position, padded queries included (they attend to the real keys).
  assert _rel(ours, expected["hidden"]) < 1e-4
  # The padding is masked: without the mask the short rows change.
  unmasked = _our_block(sd, inputs["hidden_states"], np.ones_like(valid), inputs["positions"])
  assert _rel(unmasked[2, :5], expected["hidden"][2, :5]) > 1e-2


@pytest.mark.parity
def test_rope_tables_match_llama_fixture(llama_fixture):
  _, inputs, expected = llama_fixture
  for positions, head_dim, cos, sin in ((inputs["positions"], HEAD_DIM, expected["cos"], expected["sin"]),
                                        (inputs["rope_positions"], 32, expected["rope_cos"],
                                         expected["rope_sin"])):
    angles = positions[..., None].astype(np.float32) * np.asarray(rope.rope_inverse_frequencies(head_dim, 1e4))
    # Rotate-half: the tables repeat the head_dim/2 angles twice.
    np.testing.assert_allclose(np.cos(np.concatenate([angles, angles], -1)), cos, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.sin(np.concatenate([angles, angles], -1)), sin, rtol=0, atol=2e-6)


@pytest.mark.parity
def test_rope_matches_llama_fixture(llama_fixture):
  _, inputs, expected = llama_fixture
  ours = rope.apply_rope(jnp.asarray(inputs["rope_x"]), jnp.asarray(inputs["rope_positions"]), 10000.0)
  assert _rel(ours, expected["rope_out"]) < 1e-5
  assert _rel(inputs["rope_x"], expected["rope_out"]) > 0.1  # The rotation is not the identity.


@pytest.mark.parity
def test_block_matches_live_transformers_llama_layer(llama_fixture):
  """Optional: the same layer run by the installed transformers (needs torch)."""
  torch = pytest.importorskip("torch", reason="optional live comparison: torch is not installed")
  modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                       reason="optional live comparison: transformers is not installed")
  sd, inputs, expected = llama_fixture
  config = modeling_llama.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS, intermediate_size=4 * HIDDEN,
                                      rms_norm_eps=1e-6, rope_theta=10000.0,
                                      max_position_embeddings=512, attn_implementation="eager")
  layer = modeling_llama.LlamaDecoderLayer(config, layer_idx=0).eval()
  missing, unexpected = layer.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  with torch.no_grad():
    xt = torch.from_numpy(inputs["hidden_states"])
    pos = torch.from_numpy(inputs["positions"]).long()
    kwargs = {}
    if hasattr(modeling_llama, "LlamaRotaryEmbedding"):
      try:  # transformers >= 4.45 passes the rotary tables in.
        kwargs["position_embeddings"] = modeling_llama.LlamaRotaryEmbedding(config=config)(xt, pos)
      except TypeError:
        pass
    out = layer(xt, attention_mask=torch.from_numpy(inputs["attention_mask"]), position_ids=pos, **kwargs)
    live = (out[0] if isinstance(out, tuple) else out).numpy()
  assert _rel(live, expected["hidden"]) < 1e-4
  ours = _our_block(sd, inputs["hidden_states"], inputs["valid"].astype(bool), inputs["positions"])
  assert _rel(ours, live) < 1e-4


def test_adaptive_rms_norm_matches_formula():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 5, 16)).astype(np.float32)
  c = rng.standard_normal((3, 8)).astype(np.float32)
  w = rng.standard_normal((8, 16)).astype(np.float32)
  b = rng.standard_normal((16,)).astype(np.float32)
  out = norms.AdaptiveRMSNorm(eps=1e-6).apply({"params": {"to_weight": {"kernel": w, "bias": b}}},
                                               jnp.asarray(x), jnp.asarray(c))
  expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * (c @ w + b)[:, None, :]
  assert _rel(out, expected) < 1e-5


def test_adaptive_rms_norm_starts_as_identity_gain():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 8)), jnp.float32)
  c = jnp.ones((2, 8))
  module = norms.AdaptiveRMSNorm()
  variables = module.init(jax.random.key(0), x, c)
  out = module.apply(variables, x, c)
  np.testing.assert_allclose(out, x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6), rtol=1e-5)


def test_timestep_embedding_uses_raw_t_sines_first():
  emb = np.asarray(embeddings.timestep_embedding(jnp.array([0.0, 0.5]), 8))
  freqs = np.exp(-np.arange(4) * np.log(1e4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(0.5 * freqs), np.cos(0.5 * freqs)]), rtol=1e-6)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
