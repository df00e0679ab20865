"""The fused AdamW update: the optax chain's arithmetic and state, leaf by leaf, guarded."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metis_jax.training import optimizer, update


def _train_cfg(clip: float, weight_decay: float = 0.1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=3e-3, end_learning_rate_ratio=0.1, warmup_steps=2, steps=10, decay="cosine",
      adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=weight_decay, grad_clip_norm=clip))


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"mlp": {"kernel": jax.random.normal(k[0], (4, 6)), "bias": jax.random.normal(k[1], (6,))},
          "input_norm": {"kernel": jax.random.normal(k[2], (4, 4))},  # a norm: no decay
          "token_embed": {"embedding": jax.random.normal(k[3], (5, 4))}}


def _grads(step: int, scale: float):
  keys = iter(jax.random.split(jax.random.key(100 + step), 4))
  return jax.tree.map(lambda p: scale * jax.random.normal(next(keys), p.shape), _params())


def _reference_step(cfg):
  """optax's chain: `update` + `optax.apply_updates`, kept unchanged on a non-finite loss or norm."""
  tx = optimizer.adamw_chain(cfg)

  def step(g, s, p, loss):
    norm = optax.tree.norm(g)
    updates, new_s = tx.update(g, s, p)
    ok = jnp.isfinite(loss) & jnp.isfinite(norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return keep(optax.apply_updates(p, updates), p), keep(new_s, s), norm, ~ok

  return step


def _run(cfg, use_fused: bool, scales, losses):
  opt = optimizer.make_optimizer(cfg)
  params = _params()
  state = opt.init(params)
  if use_fused:
    step = jax.jit(lambda g, s, p, loss: update.guarded_update(opt, g, s, p, loss, True))
  else:
    step = jax.jit(_reference_step(cfg))
  skipped = []
  for i, (scale, loss) in enumerate(zip(scales, losses)):
    params, state, _, skip = step(_grads(i, scale), state, params, jnp.float32(loss))
    skipped.append(bool(skip))
  return params, state, skipped


@pytest.mark.parametrize("clip", [0.0, 1.0, 100.0])
def test_matches_the_optax_chain_over_steps(clip):
  """Norms of about 0.3-30 against clip 1 (clipped some steps) and 100 (never); 0 = no clip."""
  cfg = _train_cfg(clip)
  scales, losses = [0.1, 3.0, 0.05, 1.0, 2.0], [1.0] * 5
  want_p, want_s, _ = _run(cfg, False, scales, losses)
  got_p, got_s, _ = _run(cfg, True, scales, losses)
  assert jax.tree.structure(got_s) == jax.tree.structure(want_s)  # checkpoint layout kept
  for got, want in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s))):
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  # Weight decay reached the kernel but not the norm gain: zero gradients for one step.
  assert not np.allclose(got_p["mlp"]["kernel"], _params()["mlp"]["kernel"])


def test_non_finite_step_changes_nothing():
  cfg = _train_cfg(1.0)
  _, _, skipped = _run(cfg, True, [1.0, 1.0], [1.0, float("nan")])
  assert skipped == [False, True]
  p1, s1, _ = _run(cfg, True, [1.0], [1.0])
  p2, s2, _ = _run(cfg, True, [1.0, 1.0], [1.0, float("inf")])
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(a, b)


def test_fewer_temporaries_than_the_optax_path():
  """The point of fusing: XLA's temp buffer for an update of ~8 MiB of parameters."""
  cfg = _train_cfg(1.0)
  params = {f"l{i}": {"kernel": jnp.ones((512, 512))} for i in range(8)}
  opt = optimizer.make_optimizer(cfg)
  state = opt.init(params)

  def temp_bytes(step):
    fn = jax.jit(lambda g, s, p: step(g, s, p, jnp.float32(1))[:2], donate_argnums=(1, 2))
    return fn.lower(params, state, params).compile().memory_analysis().temp_size_in_bytes

  fused = lambda g, s, p, loss: update.guarded_update(opt, g, s, p, loss, True)
  assert temp_bytes(fused) < temp_bytes(_reference_step(cfg))


def test_the_guarded_update_clips_with_its_norm_like_optax():
  """A clip of 0.1 against a norm of about 8.2: the norm computed once for the metrics and the
  finiteness check is the one that clips, and the result is optax's clip -> AdamW."""
  cfg = _train_cfg(0.1)
  params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros((4,))}}
  grads = {"dense": {"kernel": jnp.full((4, 4), 2.0), "bias": jnp.full((4,), -1.0)}}
  opt = optimizer.make_optimizer(cfg)
  new, state, norm, skipped = update.guarded_update(opt, grads, opt.init(params), params, jnp.float32(1.0), True)
  assert abs(float(norm) - np.sqrt(16 * 4 + 4)) < 1e-5 and not bool(skipped)
  want, want_state, _, _ = _reference_step(cfg)(grads, opt.init(params), params, jnp.float32(1.0))
  for got, ref in zip(jax.tree.leaves((new, state)), jax.tree.leaves((want, want_state))):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
  # The clipped first moment is (1 - b1) * g * 0.1 / norm.
  np.testing.assert_allclose(optimizer._find_state(state, optax.ScaleByAdamState).mu["dense"]["kernel"],
                             0.1 * 2.0 * 0.1 / np.sqrt(68.0), rtol=1e-5)  # pylint: disable=protected-access


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_gradient_scale_given_to_the_update_equals_scaled_gradients(clip):
  # grad_scale (the step's 1 / scored tokens) is applied inside the update, not written out.
  opt = optimizer.make_optimizer(_train_cfg(clip))
  params = _params()
  state = opt.init(params)
  sums, inverse = _grads(0, 40.0), jnp.float32(1 / 37)
  pre = update.guarded_update(opt, jax.tree.map(lambda g: g * inverse, sums), state, params,
                              jnp.float32(1.0), True)
  inside = update.guarded_update(opt, sums, state, params, jnp.float32(1.0), True, grad_scale=inverse)
  np.testing.assert_allclose(inside[2], pre[2], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(inside[:2]), jax.tree.leaves(pre[:2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The first moments took the gradients (the first step's learning rate is 0: params stay).
  mu = optimizer._find_state(inside[1], optax.ScaleByAdamState).mu  # pylint: disable=protected-access
  assert min(np.abs(m).max() for m in jax.tree.leaves(mu)) > 1e-3
