"""The loss from hidden states (chunked logits) against the full-logits loss: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.models import masking, metis, s2a
from metis_jax.nn import transformer


def _dense(head, hidden):
  return (jnp.einsum("bte,ev->btv", hidden, head["kernel"]) + head["bias"]).astype(jnp.float32)


def _problem(batch=3, length=13, embed=8, vocab=4099, seed=0):
  rng = np.random.default_rng(seed)
  head = {"kernel": jnp.asarray(rng.standard_normal((embed, vocab)), jnp.float32),
          "bias": jnp.asarray(rng.standard_normal(vocab), jnp.float32)}
  hidden = jnp.asarray(rng.standard_normal((batch, length, embed)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  weights = rng.random((batch, length)) < 0.4
  weights[1] = False  # a row with nothing scored
  weights[2, -1] = True  # a scored position in the last (padded) chunk
  return head, hidden, targets, jnp.asarray(weights)


def _numpy_loss(head, hidden, targets, weights):
  logits = np.einsum("bte,ev->btv", np.asarray(hidden, np.float64),
                     np.asarray(head["kernel"], np.float64)) + np.asarray(head["bias"], np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights, np.float64)
  correct = logits.argmax(-1) == np.asarray(targets)
  return ((log_z - target) * w).sum() / w.sum(), (correct * w).sum() / w.sum(), w.sum()


@pytest.mark.parametrize("chunk_size", [4, 5, 13, 64])
def test_chunked_equals_full_logits_loss_and_gradients(chunk_size):
  head, hidden, targets, weights = _problem()
  expected = _numpy_loss(head, hidden, targets, weights)

  def full(head, hidden):
    return masking.masked_cross_entropy(_dense(head, hidden), targets, weights)

  def chunked(head, hidden):
    return masking.chunked_cross_entropy(_dense, head, hidden, targets, weights, chunk_size)

  got = jax.jit(chunked)(head, hidden)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(float(g), e, rtol=1e-5)
  grad_full = jax.grad(lambda *a: full(*a)[0], argnums=(0, 1))(head, hidden)
  grad_chunked = jax.jit(jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1)))(head, hidden)
  for a, b in zip(jax.tree_util.tree_leaves(grad_full), jax.tree_util.tree_leaves(grad_chunked)):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_chunked_loss_of_nothing_scored_is_zero_with_zero_gradient():
  head, hidden, targets, weights = _problem()
  none = jnp.zeros_like(weights)
  loss, acc, count = masking.chunked_cross_entropy(_dense, head, hidden, targets, none, 4)
  assert (float(loss), float(acc), float(count)) == (0.0, 0.0, 0.0)
  grads = jax.grad(lambda h: masking.chunked_cross_entropy(_dense, h, hidden, targets, none, 4)[0])(head)
  assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads))


def test_chunked_loss_backward_has_no_scatter():
  """The label pick and the row packing are one-hot products and gathers, not scatter-adds."""
  head, hidden, targets, weights = _problem()
  loss = lambda head, hidden: masking.chunked_cross_entropy(_dense, head, hidden, targets,
                                                            weights, 4)[0]
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(head, hidden).as_text()
  assert "gather" in text and "scatter" not in text


def _tiny_backbone():
  return transformer.BackboneConfig(hidden_size=32, num_layers=1, num_heads=4)


def _corruption(valid, seed):
  return masking.sample_training_mask(jax.random.key(seed), jnp.asarray(valid),
                                      masking.MaskingConfig())


def _loss_accuracy_count_and_grad(loss_fn, params):
  """(loss, (accuracy, count)), d loss / d params of `loss_fn(params) -> (loss, accuracy, count)`,
  jitted: one compile per function (op-by-op execution of the model costs many)."""
  def split(p):
    loss, *aux = loss_fn(p)
    return loss, tuple(aux)

  return jax.jit(jax.value_and_grad(split, has_aux=True))(params)


def _assert_same(reference_fn, lean_fn, params):
  (ref, ref_aux), ref_grad = _loss_accuracy_count_and_grad(reference_fn, params)
  (lean, lean_aux), lean_grad = _loss_accuracy_count_and_grad(lean_fn, params)
  np.testing.assert_allclose(float(lean), float(ref), rtol=1e-5)
  np.testing.assert_allclose([float(x) for x in lean_aux], [float(x) for x in ref_aux], rtol=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(ref_grad):
    b = dict(jax.tree_util.tree_leaves_with_path(lean_grad))[path]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_metis_training_loss_equals_full_logits_loss():
  cfg = metis.MetisConfig(backbone=_tiny_backbone(), vocab_size=4096, use_phone_cond=True,
                          phone_vocab_size=12, phone_pad_id=11)
  model = metis.MetisModel(cfg)
  params = jax.jit(metis.init_params, static_argnums=0)(model, jax.random.key(0))
  rng = np.random.default_rng(1)
  valid = np.arange(20)[None] < np.array([[20], [11]])
  tokens = jnp.asarray(rng.integers(0, 4096, (2, 20)), jnp.int32)
  phones = jnp.asarray([[1, 2, 3, 11], [4, 5, 11, 11]], jnp.int32)
  rows = _corruption(valid, 2)
  weights = rows.is_masked & jnp.asarray(valid)

  def reference(p):
    _, logits = model.apply({"params": p}, tokens, rows.is_masked, jnp.asarray(valid), rows.t,
                            phones=phones)
    return masking.masked_cross_entropy(logits, tokens, weights)

  def lean(p):
    return metis.training_loss(p, model, tokens, jnp.asarray(valid), rows, phones=phones,
                               chunk_size=8)

  _assert_same(reference, lean, params)


@pytest.mark.slow
def test_s2a_training_loss_equals_full_logits_loss():
  cfg = s2a.S2AConfig(backbone=_tiny_backbone(), codebook_size=4096, num_quantizers=4,
                      cond_vocab_size=30)
  model = s2a.S2AModel(cfg)
  params = jax.jit(s2a.init_params, static_argnums=0)(model, jax.random.key(3))
  rng = np.random.default_rng(4)
  valid = jnp.asarray(np.arange(16)[None] < np.array([[16], [9]]))
  tokens = jnp.asarray(rng.integers(0, 4096, (2, 16, 4)), jnp.int32)
  cond = jnp.asarray(rng.integers(0, 30, (2, 16)), jnp.int32)
  rows = _corruption(valid, 5)
  layer = jnp.int32(2)

  def reference(p):
    _, logits = model.apply({"params": p}, tokens, cond, layer, rows.is_masked, rows.is_prompt,
                            valid, rows.t)
    return masking.masked_cross_entropy(logits, tokens[..., 2], rows.is_masked & valid)

  def lean(p):
    return s2a.training_loss(p, model, tokens, cond, valid, layer, rows, chunk_size=5)

  _assert_same(reference, lean, params)


@pytest.mark.slow
def test_s2a_stacked_embedding_equals_per_layer_embeddings():
  """One gather from the stacked table gives each layer's own embedding, bit for bit."""
  cfg = s2a.S2AConfig(backbone=_tiny_backbone(), codebook_size=24, num_quantizers=4,
                      cond_vocab_size=30)
  model = s2a.S2AModel(cfg)
  params = jax.jit(s2a.init_params, static_argnums=0)(model, jax.random.key(6))
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 24, (2, 5, 4)), jnp.int32)
  stacked = model.apply({"params": params}, tokens, method=s2a.S2AModel.embed_all_layers)
  table = np.asarray(params["token_embedding"])
  for q in range(4):
    np.testing.assert_array_equal(np.asarray(stacked[:, :, q]), table[q][np.asarray(tokens[..., q])])
