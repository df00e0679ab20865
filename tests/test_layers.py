"""Backbone layers against their formulas and against transformers' Llama layer."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from metis_jax.nn import attention, embeddings, norms, rope, transformer

torch = pytest.importorskip("torch", reason="the Llama comparison needs torch (test extra)")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                     reason="the Llama comparison needs transformers (test extra)")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _hf_layer_and_params(hidden, heads, seed=0):
  config = modeling_llama.LlamaConfig(hidden_size=hidden, num_attention_heads=heads,
                                      num_key_value_heads=heads, intermediate_size=4 * hidden,
                                      rms_norm_eps=1e-6, rope_theta=10000.0,
                                      max_position_embeddings=512, attn_implementation="eager")
  torch.manual_seed(seed)
  layer = modeling_llama.LlamaDecoderLayer(config, layer_idx=0).eval()
  with torch.no_grad():
    for p in layer.parameters():
      p.normal_(0, 1 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 1.0)
    layer.input_layernorm.weight.add_(1.0)
    layer.post_attention_layernorm.weight.add_(1.0)
  rotary = modeling_llama.LlamaRotaryEmbedding(config=config)
  sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
  d = hidden // heads
  # AdaRMSNorm with W = 0 and b = RMSNorm weight is exactly Llama's RMSNorm.
  norm = lambda w: {"to_weight": {"kernel": np.zeros((hidden, hidden), np.float32), "bias": w}}
  params = {
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
  return layer, rotary, params


def test_block_matches_transformers_llama_layer_bidirectional_with_padding():
  hidden, heads, batch, length = 64, 4, 2, 12
  layer, rotary, params = _hf_layer_and_params(hidden, heads)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, length, hidden)).astype(np.float32)
  valid = np.ones((batch, length), bool)
  valid[1, 9:] = False
  positions = np.broadcast_to(np.arange(length), (batch, length))

  with torch.no_grad():
    xt = torch.from_numpy(x)
    pos = torch.from_numpy(np.ascontiguousarray(positions)).long()
    cos_sin = rotary(xt, pos)
    additive = np.where(valid[:, None, None, :], 0.0, np.finfo(np.float32).min).astype(np.float32)
    additive = np.broadcast_to(additive, (batch, 1, length, length)).copy()
    out = layer(xt, attention_mask=torch.from_numpy(additive), position_ids=pos,
                position_embeddings=cos_sin)
    expected = (out[0] if isinstance(out, tuple) else out).numpy()

  cfg = transformer.BackboneConfig(hidden_size=hidden, num_layers=1, num_heads=heads)
  block = transformer.TransformerBlock(cfg)
  cond = jnp.zeros((batch, hidden), jnp.float32)
  ours, _ = block.apply({"params": params}, jnp.asarray(x), cond, jnp.asarray(positions),
                        attention.attention_mask(jnp.asarray(valid)))
  assert _rel(ours, expected) < 1e-4


def test_rope_matches_transformers():
  head_dim, length = 32, 20
  config = modeling_llama.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2,
                                      rope_theta=10000.0)
  rotary = modeling_llama.LlamaRotaryEmbedding(config=config)
  x = np.random.default_rng(1).standard_normal((1, length, 2, head_dim)).astype(np.float32)
  pos = np.arange(length)[None] + 7
  with torch.no_grad():
    cos, sin = rotary(torch.zeros(1), torch.from_numpy(pos).long())
    q = torch.from_numpy(x).transpose(1, 2)
    expected, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
    expected = expected.transpose(1, 2).numpy()
  ours = rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
  assert _rel(ours, expected) < 1e-5


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
