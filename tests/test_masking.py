"""The training corruption and the masked loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.models import masking


def _valid(lengths, size):
  return jnp.asarray(np.arange(size)[None] < np.asarray(lengths)[:, None])


def test_mask_respects_prompt_padding_and_is_never_empty():
  cfg = masking.MaskingConfig()
  lengths = np.array([1, 2, 3, 10, 37, 64] * 40)
  valid = _valid(lengths, 64)
  m = jax.jit(masking.sample_training_mask, static_argnums=2)(jax.random.key(0), valid, cfg)
  is_masked, is_prompt = np.asarray(m.is_masked), np.asarray(m.is_prompt)
  valid = np.asarray(valid)
  assert not (is_masked & ~valid).any(), "padding masked"
  assert not (is_masked & is_prompt).any(), "prompt masked"
  assert is_masked.any(-1).all(), "a sample without a masked token"
  prompt = np.asarray(m.prompt_lengths)
  assert (prompt < np.maximum(lengths, 1)).all()
  low = np.minimum(lengths // 4, 5)
  kept = prompt > 0
  assert (prompt[kept] >= low[kept]).all()
  assert (prompt[kept] < np.maximum(np.floor(0.4 * lengths), low + 1)[kept]).all()
  np.testing.assert_array_equal(is_prompt.sum(-1), prompt)
  assert (np.asarray(m.ratio) >= 0.2 - 1e-7).all()
  assert ((np.asarray(m.t) >= 1e-5) & (np.asarray(m.t) <= 1)).all()


def test_mask_fraction_and_prompt_drop_rate_match_their_settings():
  cfg = masking.MaskingConfig(prompt_drop_prob=0.15)
  n, length = 4000, 100
  m = masking.sample_training_mask(jax.random.key(1), jnp.ones((n, length), bool), cfg)
  candidates = 100 - np.asarray(m.prompt_lengths)
  frac = np.asarray(m.is_masked).sum(-1) / candidates
  np.testing.assert_allclose(frac.mean(), np.asarray(m.ratio).mean(), atol=0.01)
  # prompt length 0 happens only through the drop (low bound is 5 here).
  np.testing.assert_allclose((np.asarray(m.prompt_lengths) == 0).mean(), 0.15, atol=0.02)
  ratio = np.asarray(m.ratio)
  expected = np.maximum(np.sin(np.pi / 2 * np.asarray(m.t)), 0.2)
  np.testing.assert_allclose(ratio, expected, rtol=1e-5)


@pytest.mark.parametrize("schedule", masking.SCHEDULES)
def test_schedules_run_from_one_to_zero(schedule):
  t = np.linspace(0, 1, 11, dtype=np.float32)
  g = masking.mask_ratio(t, schedule)
  assert abs(g[0]) < 1e-6 and abs(g[-1] - 1) < 1e-6
  assert (np.diff(g) > 0).all()
  np.testing.assert_allclose(np.asarray(masking.mask_ratio(jnp.asarray(t), schedule)), g, atol=1e-6)


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="schedule"):
    masking.MaskingConfig(schedule="cubic")


def test_masked_cross_entropy_is_normalized_by_masked_count():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], np.float32)
  loss, acc, count = masking.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                                  jnp.asarray(weights))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (ce * weights).sum() / 3, rtol=1e-5)
  np.testing.assert_allclose(float(acc), ((logits.argmax(-1) == targets) * weights).sum() / 3)
  assert float(count) == 3
  zero_loss, _, zero_count = masking.masked_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), jnp.zeros_like(jnp.asarray(weights)))
  assert float(zero_loss) == 0 and float(zero_count) == 0


def test_argmax_hits_equals_argmax_comparison_with_ties():
  rng = np.random.default_rng(0)
  # Few distinct values, so most rows hold tied maxima (argmax takes the first).
  logits = rng.integers(0, 4, (6, 50, 37)).astype(np.float32)
  logits[0, 0] = 2.0  # a constant row: only index 0 is the argmax
  logits[0, 1, -1] = np.inf
  targets = rng.integers(0, 37, (6, 50))
  targets[:, :10] = logits[:, :10].argmax(-1)  # some hits for sure
  hits = jax.jit(masking.argmax_hits)(jnp.asarray(logits), jnp.asarray(targets))
  want = logits.argmax(-1) == targets
  np.testing.assert_array_equal(np.asarray(hits), want)
  assert want.sum() >= 60 and (~want).sum() >= 60
  # A row holding NaN is never a hit.
  nan_row = jnp.asarray([[1.0, jnp.nan, 3.0]])
  assert not bool(masking.argmax_hits(nan_row, jnp.asarray([1]))[0])
