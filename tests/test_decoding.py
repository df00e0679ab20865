"""Invariants of the iterative decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.inference import decoding
from metis_jax.models import masking
from tests import helpers


@pytest.fixture(scope="module")
def tiny():
  return helpers.tiny_model(seed=3)


def _logits_fn(model, params, prompt_len):
  """A logits function over rows laid out as [prompt region | target region]."""
  def fn(tokens, is_masked, t):
    valid = jnp.ones(tokens.shape, bool)
    _, logits = model.apply({"params": params}, tokens, is_masked, valid,
                            jnp.full((tokens.shape[0],), t))
    return logits
  return fn


@pytest.mark.parametrize("schedule", ["sine", "cosine", "linear"])
def test_counts_follow_schedule_and_decided_tokens_stay(tiny, schedule):
  _, model, params = tiny
  lengths = np.array([20, 7, 13, 1])
  length = 24
  valid = jnp.asarray(np.arange(length)[None] < lengths[:, None])
  options = decoding.DecodeOptions(steps=6, temperature=1.0, schedule=schedule)
  tokens, history = decoding.masked_decode(_logits_fn(model, params, 0), jax.random.key(1), valid,
                                           options, return_history=True)
  masks, seen = np.asarray(history["masks"]), np.asarray(history["tokens"])
  tokens = np.asarray(tokens)
  times = decoding.time_grid(options.steps)
  ratios = masking.mask_ratio(times, schedule).astype(np.float32)
  np.testing.assert_array_equal(masks[0], np.asarray(valid))
  for s in range(1, options.steps):
    expected = np.floor(lengths.astype(np.float32) * ratios[s]).astype(int)
    np.testing.assert_array_equal(masks[s].sum(-1), expected, err_msg=f"step {s}")
    assert not (masks[s] & ~masks[s - 1]).any(), "a decided token was re-masked"
    decided = ~masks[s] & np.asarray(valid)
    np.testing.assert_array_equal(seen[s][decided], tokens[decided])
  assert not (masks & ~np.asarray(valid)[None]).any(), "padding was masked"
  assert (tokens[~np.asarray(valid)] == 0).all()
  assert (tokens < 128).all() and (tokens >= 0).all()


def test_positions_outside_valid_are_never_touched(tiny):
  _, model, params = tiny
  # Rows hold [prompt | target | padding]; only the target is generated.
  valid = np.zeros((2, 16), bool)
  valid[0, 4:12] = True
  valid[1, 2:5] = True
  prompt = np.where(~valid, np.arange(16)[None] + 30, 0).astype(np.int32)

  def fn(tokens, is_masked, t):
    return _logits_fn(model, params, 0)(jnp.where(valid, tokens, prompt), is_masked, t)

  tokens, history = decoding.masked_decode(fn, jax.random.key(0), jnp.asarray(valid),
                                           decoding.DecodeOptions(steps=4),
                                           return_history=True)
  assert not np.asarray(history["masks"])[:, ~valid].any()
  assert (np.asarray(tokens)[~valid] == 0).all()


def _decode(model, params, options, prompts, targets, key, phones=None):
  """Batch of examples -> list of token arrays (each its own length)."""
  prompt_len = max(len(p) for p in prompts) or 1
  target_len = max(targets)
  prompt = np.zeros((len(prompts), prompt_len), np.int32)
  for i, p in enumerate(prompts):
    prompt[i, :len(p)] = p
  decoder = decoding.MetisDecoder(model, options)
  out = decoder(params, key, jnp.asarray(prompt), jnp.array([len(p) for p in prompts]),
                jnp.array(targets), target_len=target_len)
  out = np.asarray(out)
  assert (out[np.arange(target_len)[None] >= np.array(targets)[:, None]] == 0).all()
  return [out[i, :t] for i, t in enumerate(targets)], decoder


def test_same_key_same_output_and_keys_matter(tiny):
  _, model, params = tiny
  options = decoding.DecodeOptions(steps=5, cfg=2.5, temperature=0.9)
  args = ([np.arange(6) + 1], [12])
  a, _ = _decode(model, params, options, *args, jax.random.key(7))
  b, _ = _decode(model, params, options, *args, jax.random.key(7))
  c, _ = _decode(model, params, options, *args, jax.random.key(8))
  np.testing.assert_array_equal(a[0], b[0])
  assert (a[0] != c[0]).any()


@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_sample_output_does_not_depend_on_batch_mates(tiny, cfg):
  _, model, params = tiny
  options = decoding.DecodeOptions(steps=5, cfg=cfg, temperature=0.9)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 128, 5), rng.integers(0, 128, 9), rng.integers(0, 128, 0)]
  targets = [11, 17, 6]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(42), i))(jnp.arange(3))
  together, _ = _decode(model, params, options, prompts, targets, keys)
  for i in range(3):
    alone, _ = _decode(model, params, options, [prompts[i]], [targets[i]], keys[i:i + 1])
    np.testing.assert_array_equal(alone[0], together[i], err_msg=f"sample {i}")


def test_compiles_once_for_equal_shapes(tiny):
  _, model, params = tiny
  decoder = decoding.MetisDecoder(model, decoding.DecodeOptions(steps=3))
  for seed, (p, t) in enumerate([(4, 9), (2, 5), (4, 9)]):
    decoder(params, jax.random.key(seed), jnp.ones((2, 6), jnp.int32), jnp.array([p, p - 1]),
            jnp.array([t, t - 2]), target_len=10)
  assert decoder._jitted._cache_size() == 1


def test_guidance_statistics_are_per_sample():
  rng = np.random.default_rng(0)
  h_c = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  h_u = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  valid = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  both = decoding.guide(h_c, h_u, valid, 2.5, 0.75)
  second = decoding.guide(h_c[1:, :3], h_u[1:, :3], valid[1:, :3], 2.5, 0.75)
  np.testing.assert_allclose(both[1, :3], second[0], rtol=1e-5)
  g = h_c[0] + 2.5 * (h_c[0] - h_u[0])
  expected = 0.75 * g * (np.std(h_c[0], ddof=1) / np.std(g, ddof=1)) + 0.25 * g
  np.testing.assert_allclose(both[0], expected, rtol=1e-5)


def test_remask_picks_exactly_the_least_confident():
  confidence = jnp.asarray([[0.5, 0.1, 0.9, 0.3, 0.2], [0.4, 0.4, 0.4, 0.1, 0.0]])
  candidates = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 0, 1]], bool)
  out = decoding.remask_least_confident(confidence, candidates, jnp.array([2, 2]))
  np.testing.assert_array_equal(out, [[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]])
