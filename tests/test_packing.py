"""Left-packing rows with gaps: the permutation, its gradient, and model outputs unchanged by it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.models import metis, s2a
from metis_jax.nn import attention, packing, transformer


def _gappy_valid():
  # Row 0: phone padding between segments and a tail; row 1: empty middle; row 2: all valid.
  valid = np.ones((3, 12), bool)
  valid[0, 2:5] = False
  valid[0, 10:] = False
  valid[1, 0:7] = False
  return valid


def test_left_pack_moves_valid_slots_first_in_order():
  valid = _gappy_valid()
  p = packing.left_pack(jnp.asarray(valid))
  for b in range(valid.shape[0]):
    expected = [i for i in range(12) if valid[b, i]] + [i for i in range(12) if not valid[b, i]]
    np.testing.assert_array_equal(np.asarray(p.order[b]), expected)
    np.testing.assert_array_equal(np.asarray(p.order[b])[np.asarray(p.inverse[b])], np.arange(12))
  np.testing.assert_array_equal(np.asarray(p.lengths), valid.sum(1))


def test_pack_unpack_round_trip_and_gradient_is_the_inverse_gather():
  valid = _gappy_valid()
  p = packing.left_pack(jnp.asarray(valid))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12, 5)), jnp.float32)
  packed = packing.pack(x, p)
  np.testing.assert_array_equal(np.asarray(packed[0, :7, 0]),
                                np.asarray(x[0, valid[0], 0]))
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, p)), np.asarray(x))
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 12, 5)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(packing.pack(x, p) * w))(x)
  plain = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(x, p.order[..., None], axis=1) * w))(x)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(plain))


def _backbone(pack_rows, **kw):
  return transformer.BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, pack_rows=pack_rows,
                                    **kw)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_metis_with_phones_same_outputs_packed_or_not(scan_layers):
  """Phones and tokens with padding between them: the valid outputs agree to 1e-6."""
  cfg = metis.MetisConfig(backbone=_backbone(False, scan_layers=scan_layers), vocab_size=40,
                          use_phone_cond=True, phone_vocab_size=20, phone_pad_id=19)
  model = metis.MetisModel(cfg)
  params = metis.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(2)
  batch, phone_len, length = 3, 6, 10
  phone_valid = np.arange(phone_len)[None] < np.array([[6], [2], [4]])
  valid = np.arange(length)[None] < np.array([[10], [7], [3]])
  valid[1, :2] = False  # an empty prompt slot inside the row, as in CFG's unconditional half
  args = dict(tokens=jnp.asarray(rng.integers(0, 40, (batch, length)), jnp.int32),
              is_masked=jnp.asarray(rng.random((batch, length)) < 0.5),
              valid=jnp.asarray(valid), t=jnp.asarray([0.3, 0.7, 1.0], jnp.float32),
              phones=jnp.asarray(np.where(phone_valid, rng.integers(0, 19, (batch, phone_len)), 19),
                                 jnp.int32),
              phone_valid=jnp.asarray(phone_valid))
  outs = {}
  for pack in (False, True):
    m = metis.MetisModel(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone,
                                                                               pack_rows=pack)))
    _, outs[pack] = jax.jit(m.apply)({"params": params}, **args)
  rows = valid[..., None]
  ref = np.where(rows, np.asarray(outs[False]), 0)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(np.where(rows, np.asarray(outs[True]), 0), ref, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_s2a_gradients_same_packed_or_not():
  """Training gradients of S2A (prompt/target gap in the rows) agree packed and unpacked."""
  cfg = s2a.S2AConfig(backbone=_backbone(False), codebook_size=16, num_quantizers=3,
                      cond_vocab_size=24)
  params = s2a.init_params(s2a.S2AModel(cfg), jax.random.key(1))
  rng = np.random.default_rng(3)
  batch, length = 2, 9
  valid = np.ones((batch, length), bool)
  valid[0, 3:5] = False
  valid[1, 7:] = False
  tokens = jnp.asarray(rng.integers(0, 16, (batch, length, 3)), jnp.int32)
  cond = jnp.asarray(rng.integers(0, 24, (batch, length)), jnp.int32)
  is_masked = jnp.asarray(rng.random((batch, length)) < 0.6) & jnp.asarray(valid)

  def loss(params, pack):
    m = s2a.S2AModel(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone,
                                                                           pack_rows=pack)))
    _, logits = m.apply({"params": params}, tokens, cond, jnp.int32(1), is_masked,
                        jnp.zeros_like(is_masked), jnp.asarray(valid), jnp.asarray([0.4, 0.9]))
    return jnp.sum(jnp.where(is_masked[..., None], logits, 0) ** 2)

  grads = {pack: jax.jit(jax.grad(loss), static_argnums=1)(params, pack) for pack in (False, True)}
  for a, b in zip(jax.tree_util.tree_leaves(grads[False]), jax.tree_util.tree_leaves(grads[True])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


def test_backbone_packs_rows_for_length_kernels_only():
  assert not _backbone(None).packs_rows("cpu")
  assert _backbone(None, dtype="bfloat16").packs_rows("gpu")
  assert not _backbone(None).packs_rows("gpu")  # float32: XLA, mask path
  assert _backbone(None).packs_rows("tpu")
  assert not _backbone(None, attention_impl="xla").packs_rows("tpu")
  assert _backbone(True).packs_rows("cpu")
  with pytest.raises(ValueError, match="attention_impl"):
    _backbone(None, attention_impl="flash")


@pytest.mark.slow
def test_length_mask_equals_key_padding_mask_on_packed_rows():
  """`kv_lengths` on a valid prefix is the same attention as the boolean key mask (XLA)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  lengths = np.array([16, 5])
  valid = np.arange(16)[None] < lengths[:, None]
  positions = jnp.asarray(np.cumsum(valid, 1) - 1, jnp.int32)
  layer = attention.SelfAttention(4)
  params = layer.init(jax.random.key(0), x, positions, attention.attention_mask(jnp.asarray(valid)))
  by_mask = layer.apply(params, x, positions, attention.attention_mask(jnp.asarray(valid)))
  by_length = layer.apply(params, x, positions, kv_lengths=jnp.asarray(lengths, jnp.int32))
  np.testing.assert_allclose(np.asarray(by_length), np.asarray(by_mask), atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="exactly one"):
    layer.apply(params, x, positions)
