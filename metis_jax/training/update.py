"""The guarded optimizer update every objective's step uses: a non-finite update is skipped.

An update whose loss or gradient norm is NaN/Inf leaves the parameters and
the optimizer state exactly as they were (`skip_nonfinite`); the step counts
it in its state and reports `skipped` (the loop logs it, and
`checkpointing.Checkpointer` never saves non-finite parameters).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from metis_jax.training import optimizer as optimizer_lib


def guarded_update(optimizer: optimizer_lib.Optimizer, grads: Any, opt_state: Any, params: Any,
                   loss: jax.Array, skip_nonfinite: bool, poison: Optional[jax.Array | bool] = None,
                   grad_scale: Optional[jax.Array] = None):
  """One optimizer update, skipped when the loss or the gradient norm is not finite.

  Args:
    optimizer: the optimizer of `params` (`optimizer.make_optimizer`).
    grads: gradients, a pytree like `params`.
    opt_state: `optimizer`'s state of `params`.
    params: the parameters before the update.
    loss: float32 scalar.
    skip_nonfinite: keep params and opt_state on a non-finite update (else let it through).
    poison: debug; NaN gradients where True (exercises the guard); None leaves them alone.
    grad_scale: float32 scalar the gradients are multiplied by (e.g. 1 / scored tokens), or
      None. Given here rather than applied by the caller, it scales the norm and goes into
      the update's own elementwise pass: the scaled gradients are never written out (on
      XLA:CPU the norm's reduction would materialize them, 2 passes over all gradients).
      The norm is then taken of the unscaled gradients: float32 squares them without
      overflow up to entries of 1.8e19.

  Returns:
    (params, opt_state, grad_norm float32 scalar, skipped bool scalar).
  """
  if poison is not None:
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
  # One norm serves the metrics, the finiteness check and the clip.
  grad_norm = optax.tree.norm(grads)
  if grad_scale is not None:
    grad_norm = grad_norm * grad_scale
    grads = jax.tree.map(lambda g: g * jnp.asarray(grad_scale, g.dtype), grads)
  ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)) if skip_nonfinite else jnp.ones((), bool)
  new_params, new_opt_state = optimizer.apply(grads, opt_state, params, grad_norm, ok)
  return new_params, new_opt_state, grad_norm, ~ok


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The PRNG key of step `step` of a run whose base key data is `rng` (uint32 `[2]`)."""
  return jax.random.fold_in(jax.random.wrap_key_data(rng), step)
