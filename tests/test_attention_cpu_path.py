"""The XLA attention path (`attention.xla_attention`): values, gradients and memory.

Expectations come from a float64 NumPy softmax attention and from
`jax.nn.dot_product_attention` (the path it replaces).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.nn import attention


def _reference(q, k, v, mask):
  """Float64 softmax attention; a query row with no valid key is uniform over all keys."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  mask = np.broadcast_to(np.asarray(mask), scores.shape)
  scores = np.where(mask, scores, -np.inf)
  empty = ~mask.any(-1, keepdims=True)
  scores = np.where(empty, 0.0, scores)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def _qkv(batch, length, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
               for _ in range(3))


def _masks(batch, length):
  """Key padding `[batch, 1, 1, k]`, and packed segments `[batch, 1, q, k]` with an empty row."""
  lengths = np.array([length, length - 7, 5])[:batch]
  valid = np.arange(length)[None] < lengths[:, None]
  segments = (np.arange(length)[None] >= 9).astype(int) + np.zeros((batch, 1), int)
  segments[:, -1] = 7  # its own segment, and invalid: a query row with no key
  per_query = (segments[:, :, None] == segments[:, None, :]) & valid[:, None, :]
  return jnp.asarray(valid[:, None, None, :]), jnp.asarray(per_query[:, None])


@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("kind", [0, 1])
def test_matches_float64_reference_and_jax(blocks, kind):
  q, k, v = _qkv(3, 37)  # 37 rows: blocks of unequal coverage, zero-padded
  mask = _masks(3, 37)[kind]
  ours = np.asarray(jax.jit(attention.xla_attention, static_argnames="blocks")(
      q, k, v, mask=mask, blocks=blocks))
  np.testing.assert_allclose(ours, _reference(q, k, v, mask), atol=2e-6, rtol=0)
  theirs = np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask))
  np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_key_lengths_equal_the_padding_mask():
  q, k, v = _qkv(2, 20)
  lengths = jnp.asarray([20, 6])
  mask = (jnp.arange(20)[None] < lengths[:, None])[:, None, None, :]
  for blocks in (1, 3):
    by_lengths = attention.xla_attention(q, k, v, kv_lengths=lengths, blocks=blocks)
    by_mask = attention.xla_attention(q, k, v, mask=mask, blocks=blocks)
    np.testing.assert_array_equal(np.asarray(by_lengths), np.asarray(by_mask))


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("kind", [0, 1])
def test_gradients_match_jax_attention(blocks, kind):
  q, k, v = _qkv(3, 29, seed=1)
  mask = _masks(3, 29)[kind]
  cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

  def loss(fn):
    return jax.jit(jax.grad(lambda *qkv: jnp.sum(fn(*qkv) * cotangent), argnums=(0, 1, 2)))

  ours = loss(lambda q, k, v: attention.xla_attention(q, k, v, mask=mask, blocks=blocks))(q, k, v)
  theirs = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
  for name, a, b in zip("qkv", ours, theirs):
    scale = np.max(np.abs(np.asarray(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * scale, rtol=0,
                               err_msg=f"d{name}")


def test_blocked_training_memory_is_below_jax_attention():
  """Forward + backward temp bytes: the blocks do not keep the [b, h, q, k] probabilities."""
  q, k, v = _qkv(2, 256, heads=4, head_dim=16)
  mask = _masks(2, 256)[0]

  def temp_bytes(fn):
    step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  scores = 2 * 4 * 256 * 256 * 4
  theirs = temp_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
  unblocked = temp_bytes(lambda q, k, v: attention.xla_attention(q, k, v, mask=mask))
  blocked = temp_bytes(lambda q, k, v: attention.xla_attention(q, k, v, mask=mask, blocks=4))
  assert theirs >= 3 * scores  # sanity: JAX's keeps several score-sized buffers
  assert unblocked <= theirs
  assert blocked <= unblocked // 2


def test_query_blocks_keep_block_scores_near_the_budget():
  assert attention.query_blocks(1, 4, 48, 48) == 1
  blocks = attention.query_blocks(16, 4, 650, 650)  # tiny decode, batch 8 with CFG
  rows = -(-650 // blocks)
  assert blocks > 1 and 16 * 4 * rows * 650 * 4 <= attention.BLOCK_BYTES
  assert attention.query_blocks(1, 1, 10_000, 10_000, block_bytes=1) == 10_000 // 8
