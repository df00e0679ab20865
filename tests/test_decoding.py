"""Invariants of the iterative decoder."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.inference import decoding
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
  np.testing.assert_array_equal(masks[0], np.asarray(valid))
  for s in range(1, options.steps):
    # Spec section 6: step i re-masks n_i = floor(T gamma(t_{i+1})) with t_i = 1 - i / S, so
    # step s starts with that many masked; gamma(t) = sin(pi t / 2) ("sine", the reference),
    # 1 - cos(pi t / 2) ("cosine"), t ("linear").
    t = 1 - s / options.steps
    gamma = {"sine": math.sin(math.pi * t / 2), "cosine": 1 - math.cos(math.pi * t / 2), "linear": t}[schedule]
    expected = [math.floor(n * gamma) for n in lengths.tolist()]
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


@pytest.mark.slow
def test_same_key_same_output_and_keys_matter(tiny):
  _, model, params = tiny
  options = decoding.DecodeOptions(steps=5, cfg=2.5, temperature=0.9)
  args = ([np.arange(6) + 1], [12])
  a, _ = _decode(model, params, options, *args, jax.random.key(7))
  b, _ = _decode(model, params, options, *args, jax.random.key(7))
  c, _ = _decode(model, params, options, *args, jax.random.key(8))
  np.testing.assert_array_equal(a[0], b[0])
  assert (a[0] != c[0]).any()


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- condition features


def test_split_features_puts_each_frame_in_its_slot():
  feats = np.arange(2 * 7 * 1, dtype=np.float32).reshape(2, 7, 1) + 1
  prompt, target = decoding.split_features(jnp.asarray(feats), jnp.array([3, 0]), 4, 5)
  # row 0: frames 0-2 on the prompt (slot 3 empty), frames 3-6 on the target (slot 4 past the end)
  np.testing.assert_array_equal(np.asarray(prompt)[0, :, 0], [1, 2, 3, 0])
  np.testing.assert_array_equal(np.asarray(target)[0, :, 0], [4, 5, 6, 7, 0])
  # row 1: no prompt, the first five frames on the target
  np.testing.assert_array_equal(np.asarray(prompt)[1, :, 0], [0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(target)[1, :, 0], [8, 9, 10, 11, 12])


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_adapter_sample_does_not_depend_on_batch_mates_and_its_frames_matter(cfg):
  """Contiguous [prompt; target] frames per row: a row decoded alone or batched (other prompt
  lengths and paddings) gives the same tokens, and other frames give other tokens."""
  _, model, params = helpers.tiny_model(seed=5, cond_feature_dim=6, adapter_gated=False)
  options = decoding.DecodeOptions(steps=4, cfg=cfg, temperature=0.9)
  decoder = decoding.MetisDecoder(model, options)
  rng = np.random.default_rng(1)
  prompts, targets = [rng.integers(0, 128, 5), rng.integers(0, 128, 0), rng.integers(0, 128, 8)], [9, 12, 4]
  frames = [rng.standard_normal((len(p) + t, 6)).astype(np.float32) for p, t in zip(prompts, targets)]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(3))

  def run(idx, feats, prompt_len=10, target_len=14):
    prompt = np.zeros((len(idx), prompt_len), np.int32)
    f = np.zeros((len(idx), prompt_len + target_len, 6), np.float32)
    for r, i in enumerate(idx):
      prompt[r, :len(prompts[i])] = prompts[i]
      f[r, :len(feats[i])] = feats[i]
    out = decoder(params, keys[np.asarray(idx)], jnp.asarray(prompt),
                  jnp.array([len(prompts[i]) for i in idx]), jnp.array([targets[i] for i in idx]),
                  target_len=target_len, features=jnp.asarray(f))
    return [np.asarray(out)[r, :targets[i]] for r, i in enumerate(idx)]

  together = run([0, 1, 2], frames)
  for i in range(3):
    np.testing.assert_array_equal(run([i], frames, prompt_len=8, target_len=12)[0], together[i])
  other = [f[::-1].copy() for f in frames]
  assert any((a != b).any() for a, b in zip(run([0, 1, 2], other), together))
