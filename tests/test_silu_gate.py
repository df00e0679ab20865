"""SwiGLU's gate: same values and gradients as autodiff of silu(g) * u, fewer saved arrays."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.nn import mlp


def test_values_and_gradients_match_autodiff():
  kg, ku, kc = jax.random.split(jax.random.key(0), 3)
  gate = 4 * jax.random.normal(kg, (2, 7, 16))  # both tails of the sigmoid
  up = jax.random.normal(ku, (2, 7, 16))
  cot = jax.random.normal(kc, (2, 7, 16))
  plain = lambda g, u: nn.silu(g) * u
  np.testing.assert_allclose(mlp.silu_gate(gate, up), plain(gate, up), rtol=1e-6, atol=1e-7)
  loss = lambda fn: (lambda g, u: jnp.sum(jnp.cos(fn(g, u)) * cot))
  got = jax.grad(loss(mlp.silu_gate), argnums=(0, 1))(gate, up)
  want = jax.grad(loss(plain), argnums=(0, 1))(gate, up)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_backward_keeps_only_gate_and_up():
  gate, up = jnp.ones((3, 4)), 2 * jnp.ones((3, 4))
  _, custom = jax.vjp(mlp.silu_gate, gate, up)
  _, plain = jax.vjp(lambda g, u: nn.silu(g) * u, gate, up)
  residuals = [x for x in jax.tree.leaves(custom) if getattr(x, "shape", None) == (3, 4)]
  assert len(residuals) == 2
  assert len([x for x in jax.tree.leaves(plain) if getattr(x, "shape", None) == (3, 4)]) > 2
