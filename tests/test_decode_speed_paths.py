"""The decoders' fast paths give what the plain model calls give.

- Step-invariant inputs computed once (`MetisModel.phone_prefix`,
  `MetisModel.adapter_output`, `S2AModel.condition`) give the hidden states
  of the model computing them itself (to float32 rounding: two compiled
  programs fuse differently).
- The unconditional pass of guidance runs on the target alone: the decoder's
  tokens equal those of a decode whose unconditional pass is written out with
  plain model calls over the target slots (spec: "a second pass on the target
  only, without prompt and phones"; fine-tunes keep the target's adapter
  features).
- The engine keeps two batches in flight: batch n + 1 is dispatched before
  batch n is fetched, and outputs come back in order.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax import config_lib
from metis_jax.inference import decoding, engine as engine_lib
from metis_jax.models import metis, s2a
from metis_jax.parallel import batch_layout
from tests import helpers

COND_DIM = 6


@pytest.fixture(scope="module")
def phone_adapter_model():
  """A tiny stage-1 model with a phone prefix and a condition adapter (both paths at once)."""
  return helpers.tiny_model(seed=5, use_phone_cond=True, phone_vocab_size=40, phone_pad_id=39,
                            cond_feature_dim=COND_DIM)


def _inputs(batch=2, length=10, phones=5, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 128, (batch, length)), jnp.int32)
  is_masked = jnp.asarray(rng.random((batch, length)) < 0.5)
  valid = jnp.asarray(np.arange(length)[None] < np.array([length, length - 3])[:batch, None])
  phone_ids = jnp.asarray(rng.integers(0, 39, (batch, phones)), jnp.int32)
  phone_valid = jnp.asarray(np.arange(phones)[None] < np.array([phones, 2])[:batch, None])
  features = jnp.asarray(rng.standard_normal((batch, length, COND_DIM)), jnp.float32)
  return tokens, is_masked, valid, jnp.array([0.7, 0.3][:batch]), phone_ids, phone_valid, features


@pytest.mark.slow
def test_precomputed_phone_prefix_and_adapter_output_give_the_same_hidden_states(phone_adapter_model):
  _, model, params = phone_adapter_model
  tokens, is_masked, valid, t, phones, phone_valid, features = _inputs()
  apply = lambda *a, method=metis.MetisModel.hidden_states, **k: jax.jit(
      lambda *a, **k: model.apply({"params": params}, *a, method=method, **k))(*a, **k)
  plain = apply(tokens, is_masked, valid, t, phones, phone_valid, features)
  prefix = apply(phones, method=metis.MetisModel.phone_prefix)
  added = apply(features, method=metis.MetisModel.adapter_output)
  assert prefix.shape == (2, 5, 64) and added.shape == (2, 10, 64)
  hoisted = apply(tokens, is_masked, valid, t, phone_valid=phone_valid, phone_prefix=prefix,
                  adapter_out=added)
  # Same arithmetic; only XLA's fusion of the two compiled programs differs.
  np.testing.assert_allclose(np.asarray(hoisted), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # The condition matters (the comparison above is not vacuous).
  assert np.abs(np.asarray(apply(tokens, is_masked, valid, t, phone_valid=phone_valid,
                                 phone_prefix=prefix, adapter_out=jnp.zeros_like(added))
                           - plain)).max() > 1e-3
  with pytest.raises(ValueError, match="phone_prefix"):
    apply(tokens, is_masked, valid, t, phones, phone_valid, features, phone_prefix=prefix)
  with pytest.raises(ValueError, match="adapter"):
    apply(tokens, is_masked, valid, t, phones, phone_valid, features, adapter_out=added)


@pytest.mark.slow
def test_s2a_condition_computed_once_gives_the_same_hidden_states():
  cfg = config_lib.load_config("tiny").model
  cfg.kind, cfg.vocab_size, cfg.cond_vocab_size = "s2a", 32, 64
  cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.dtype, cfg.num_quantizers = 32, 2, 1, "float32", 3
  model = s2a.S2AModel(s2a.S2AConfig.from_config(cfg))
  params = s2a.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
  cond_tokens = jnp.asarray(rng.integers(0, 64, (2, 7)), jnp.int32)
  valid = jnp.asarray(np.arange(7)[None] < np.array([[7], [4]]))
  t = jnp.array([0.5, 0.9])
  apply = lambda *a, method=s2a.S2AModel.hidden_states, **k: jax.jit(
      lambda *a, **k: model.apply({"params": params}, *a, method=method, **k))(*a, **k)
  layer = jnp.int32(1)
  condition = apply(cond_tokens, layer, method=s2a.S2AModel.condition)
  plain = np.asarray(apply(x, cond_tokens, layer, valid, t))
  np.testing.assert_allclose(np.asarray(apply(x, None, layer, valid, t, condition=condition)), plain,
                             rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(apply(x, None, layer, valid, t, condition=jnp.zeros_like(condition)))
                - plain).max() > 1e-3


@pytest.mark.slow
def test_guidance_pass_runs_on_the_target_alone(phone_adapter_model):
  """MetisDecoder == masked_decode with guidance written out with plain model calls."""
  _, model, params = phone_adapter_model
  rng = np.random.default_rng(2)
  batch, prompt_len, target_len, n_phones = 2, 4, 6, 5
  prompt = jnp.asarray(rng.integers(0, 128, (batch, prompt_len)), jnp.int32)
  prompt_lengths, target_lengths = jnp.array([4, 1]), jnp.array([6, 3])
  phones = jnp.asarray(rng.integers(0, 39, (batch, n_phones)), jnp.int32)
  phone_lengths = jnp.array([5, 2])
  prompt_feats = jnp.asarray(rng.standard_normal((batch, prompt_len, COND_DIM)), jnp.float32)
  target_feats = jnp.asarray(rng.standard_normal((batch, target_len, COND_DIM)), jnp.float32)
  options = decoding.DecodeOptions(steps=4, cfg=2.5, rescale_cfg=0.75, temperature=0.0,
                                   confidence_noise=0.0, top_k_ratio=0.2)
  tokens = decoding.MetisDecoder(model, options)(
      params, jax.random.key(0), prompt, prompt_lengths, target_lengths, target_len=target_len,
      phones=phones, phone_lengths=phone_lengths, prompt_features=prompt_feats,
      target_features=target_feats)

  prompt_valid = decoding.lengths_to_valid(prompt_lengths, prompt_len)
  target_valid = decoding.lengths_to_valid(target_lengths, target_len)
  phone_valid = decoding.lengths_to_valid(phone_lengths, n_phones)
  hidden = lambda *a, **k: model.apply({"params": params}, *a, method=metis.MetisModel.hidden_states, **k)

  def logits_fn(x, is_masked, t):
    t = jnp.full((batch,), t)
    h_cond = hidden(jnp.concatenate([prompt, x], 1),
                    jnp.concatenate([jnp.zeros_like(prompt_valid), is_masked], 1),
                    jnp.concatenate([prompt_valid, target_valid], 1), t, phones, phone_valid,
                    jnp.concatenate([prompt_feats, target_feats], 1))[:, prompt_len:]
    # Target alone: no prompt slots; the phone prefix fully masked out (a no-op on the
    # target, whose positions start at 0 either way); the target's adapter features.
    h_uncond = hidden(x, is_masked, target_valid, t, phones, jnp.zeros_like(phone_valid), target_feats)
    guided = decoding.guide(h_cond, h_uncond, target_valid, options.cfg, options.rescale_cfg)
    return model.apply({"params": params}, guided, method=metis.MetisModel.logits)

  expected = decoding.masked_decode(logits_fn, jax.random.key(0), target_valid, options)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))
  # Guidance changes the result (so the unconditional pass is exercised).
  unguided = decoding.MetisDecoder(model, decoding.DecodeOptions(**{**options.__dict__, "cfg": 0.0}))(
      params, jax.random.key(0), prompt, prompt_lengths, target_lengths, target_len=target_len,
      phones=phones, phone_lengths=phone_lengths, prompt_features=prompt_feats,
      target_features=target_feats)
  assert not np.array_equal(np.asarray(unguided), np.asarray(tokens))


def test_engine_keeps_two_batches_in_flight_and_returns_them_in_order():
  engine = engine_lib.SpeechEngine.__new__(engine_lib.SpeechEngine)
  engine.layout = batch_layout.BatchLayout(batch_layout.make_mesh(devices=jax.devices()[:1]))
  events, collected = [], []
  fetch = engine._fetch

  def fn(params, x):
    events.append(("dispatch", int(np.asarray(x)[0])))
    return x * params

  def recording_fetch(out):
    host = fetch(out)
    events.append(("fetch", int(host[0]) // 10))
    return host

  engine._fetch = recording_fetch
  batches = [engine_lib.PlannedBatch((i,), (1,), 1) for i in range(3)]
  start = time.perf_counter()
  engine._in_flight(batches, lambda b: (fn, 10, np.array([b.indices[0]], np.int32)),
                    lambda b, out, s: collected.append((b.indices[0], int(out[0]), s)))
  wall = time.perf_counter() - start
  assert events == [("dispatch", 0), ("dispatch", 1), ("fetch", 0), ("dispatch", 2), ("fetch", 1),
                    ("fetch", 2)]
  assert [(i, v) for i, v, _ in collected] == [(0, 0), (1, 10), (2, 20)]
  seconds = [s for *_, s in collected]
  assert all(s >= 0 for s in seconds) and sum(seconds) <= wall
