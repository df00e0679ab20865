"""The CPU projection matmul: same values and gradients as plain autodiff, and actually used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.nn import matmul


def _plain(x, kernel, contract):
  axes = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
  return jax.lax.dot_general(x, kernel, (axes, ((), ())))


@pytest.mark.parametrize("x_shape,k_shape,contract", [
    ((3, 5, 8), (8, 4, 6), 1),        # q/k/v: [B, T, H] x [H, heads, head_dim]
    ((3, 5, 4, 6), (4, 6, 8), 2),     # output projection over (heads, head_dim)
    ((7, 8), (8, 16), 1),             # 2-D input
])
def test_values_and_gradients_match_autodiff(x_shape, k_shape, contract):
  kx, kk, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, k_shape)
  cot = jax.random.normal(kc, x_shape[:len(x_shape) - contract] + k_shape[contract:])

  def loss(fn):
    return lambda x, k: jnp.sum(jnp.sin(fn(x, k)) * cot)

  cpu = lambda x, k: matmul.contract_trailing(x, k, contract, backend="cpu")
  plain = lambda x, k: _plain(x, k, contract)
  np.testing.assert_allclose(cpu(x, kernel), plain(x, kernel), rtol=1e-6, atol=1e-6)
  got = jax.grad(loss(cpu), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(plain), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_cpu_takes_the_custom_vjp_and_other_backends_do_not():
  x, kernel = jnp.ones((2, 3)), jnp.ones((3, 4))
  cpu = str(jax.make_jaxpr(lambda x, k: matmul.contract_trailing(x, k, 1, "cpu"))(x, kernel))
  tpu = str(jax.make_jaxpr(lambda x, k: matmul.contract_trailing(x, k, 1, "tpu"))(x, kernel))
  assert "custom_vjp" in cpu
  assert "custom_vjp" not in tpu and "dot_general" in tpu


def test_kernel_gradient_has_x_as_left_operand():
  """The point of the rewrite: dkernel = dot(x, dy), not dot(dy, x) followed by a transpose."""
  x, kernel = jnp.ones((5, 3)), jnp.ones((3, 4))
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda x, k: jnp.sum(matmul.contract_trailing(x, k, 1, "cpu")), argnums=1))(x, kernel)
  kernel_grads = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"
                  and e.outvars[0].aval.shape == (3, 4)]
  assert len(kernel_grads) == 1
  assert kernel_grads[0].invars[0] is jaxpr.jaxpr.invars[0]  # x is the left operand
  assert not any(e.primitive.name == "transpose" for e in jaxpr.eqns)
