"""Whole-model behaviour: learning, scan equivalence, adapter no-op, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metis_jax.models import masking, metis
from metis_jax.conversion import common
from tests import helpers


@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch():
  cfg = helpers.tiny_model_config(vocab_size=64)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = metis.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (4, 32)), jnp.int32)
  valid = jnp.asarray(np.arange(32)[None] < np.array([32, 30, 24, 17])[:, None])
  corruption = masking.sample_training_mask(jax.random.key(1), valid, masking.MaskingConfig())
  weights = corruption.is_masked & valid
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  def loss_fn(p):
    _, logits = model.apply({"params": p}, tokens, corruption.is_masked, valid, corruption.t)
    return masking.masked_cross_entropy(logits, tokens, weights)[0]

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  first = None
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  assert first > 3.0
  assert float(loss) < 0.1, f"masked loss only fell from {first:.3f} to {float(loss):.3f}"


@pytest.mark.slow
def test_scan_and_unrolled_layers_give_identical_outputs():
  cfg_scan, model_scan, params = helpers.tiny_model(seed=1, scan_layers=True)
  cfg_loop = helpers.tiny_model_config(scan_layers=False)
  model_loop = metis.MetisModel(metis.MetisConfig.from_config(cfg_loop))
  params_loop = dict(params, backbone=common.unstack_layers(params["backbone"]))
  structure = jax.tree_util.tree_structure(metis.init_params(model_loop, jax.random.key(0)))
  assert jax.tree_util.tree_structure(params_loop) == structure
  args = model_scan.init_inputs(2, 12)
  args["is_masked"] = jnp.arange(12)[None, :] % 3 == 0
  args["t"] = jnp.array([0.3, 0.9])
  out_scan = model_scan.apply({"params": params}, **args)
  out_loop = model_loop.apply({"params": params_loop}, **args)
  for a, b in zip(out_scan, out_loop):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_remat_does_not_change_outputs_or_gradients():
  _, model, params = helpers.tiny_model(seed=2)
  cfg = helpers.tiny_model_config(remat_policy="full")
  remat_model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  args = model.init_inputs(2, 8)
  args["tokens"] = jax.random.randint(jax.random.key(0), (2, 8), 0, 128)
  args["is_masked"] = jnp.arange(8)[None, :] % 2 == 0

  def loss(m, p):
    return jnp.sum(m.apply({"params": p}, **args)[1] ** 2)

  g1 = jax.grad(lambda p: loss(model, p))(params)
  g2 = jax.grad(lambda p: loss(remat_model, p))(params)
  def close(a, b):
    scale = float(np.abs(b).max())
    assert float(np.abs(a - b).max()) <= 1e-4 * scale + 1e-12, (float(np.abs(a - b).max()), scale)

  jax.tree_util.tree_map(close, g1, g2)


@pytest.mark.slow
def test_new_adapter_is_an_exact_no_op_until_its_gate_moves():
  _, base_model, base_params = helpers.tiny_model(seed=4)
  cfg = helpers.tiny_model_config(cond_feature_dim=16)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  params = metis.init_params(model, jax.random.key(0))
  params = dict(base_params, adapter=params["adapter"])
  args = base_model.init_inputs(2, 8)
  features = jax.random.normal(jax.random.key(1), (2, 8, 16))
  _, base = base_model.apply({"params": base_params}, **args)
  _, with_adapter = model.apply({"params": params}, **args, features=features)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(with_adapter))
  params["adapter"]["gate_scale"] = jnp.ones(())
  _, moved = model.apply({"params": params}, **args, features=features)
  assert np.abs(np.asarray(moved) - np.asarray(base)).max() > 1e-3


@pytest.mark.slow
def test_padding_does_not_change_valid_outputs():
  _, model, params = helpers.tiny_model(seed=5)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 128, (1, 10)), jnp.int32)
  masked = jnp.asarray(rng.random((1, 10)) < 0.5)
  t = jnp.array([0.5])
  h_short, _ = model.apply({"params": params}, tokens, masked, jnp.ones((1, 10), bool), t)
  padded = jnp.concatenate([tokens, jnp.full((1, 6), 7, jnp.int32)], 1)
  padded_mask = jnp.concatenate([masked, jnp.zeros((1, 6), bool)], 1)
  valid = jnp.arange(16)[None] < 10
  h_long, _ = model.apply({"params": params}, padded, padded_mask, valid, t)
  np.testing.assert_allclose(np.asarray(h_long[:, :10]), np.asarray(h_short), rtol=1e-5, atol=1e-5)
