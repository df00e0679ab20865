"""The guarded optimizer update every objective's step uses: a non-finite update is skipped.

An update whose loss or gradient norm is NaN/Inf leaves the parameters and
the optimizer state exactly as they were (`skip_nonfinite`); the step counts
it in its state and reports `skipped` (the loop logs it, and
`checkpointing.Checkpointer` never saves non-finite parameters).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax


def guarded_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                   loss: jax.Array, skip_nonfinite: bool, poison: Optional[jax.Array | bool] = None,
                   fused: Optional[Callable] = None):
  """One optimizer update, skipped when the loss or the gradient norm is not finite.

  Args:
    tx: the optimizer of `params`.
    grads: gradients, a pytree like `params`.
    opt_state: `tx`'s state of `params`.
    params: the parameters before the update.
    loss: float32 scalar.
    skip_nonfinite: keep params and opt_state on a non-finite update (else let it through).
    poison: debug; NaN gradients where True (exercises the guard); None leaves them alone.
    fused: `optimizer.fused_adamw(cfg)` of the `make_optimizer(cfg)` that made `tx`: the
      same update computed leaf by leaf (fewer temporaries); None runs `tx.update`.

  Returns:
    (params, opt_state, grad_norm float32 scalar, skipped bool scalar).
  """
  if poison is not None:
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
  grad_norm = optax.tree.norm(grads)
  if fused is not None:
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)) if skip_nonfinite else jnp.ones((), bool)
    new_params, new_opt_state = fused(grads, opt_state, params, grad_norm, ok)
    return new_params, new_opt_state, grad_norm, ~ok
  # The clip of `optimizer.make_optimizer` reuses this norm rather than computing it again.
  extra = {"grad_norm": grad_norm} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
  updates, new_opt_state = tx.update(grads, opt_state, params, **extra)
  new_params = optax.apply_updates(params, updates)
  if not skip_nonfinite:
    return new_params, new_opt_state, grad_norm, jnp.zeros((), bool)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return keep(new_params, params), keep(new_opt_state, opt_state), grad_norm, ~ok


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The PRNG key of step `step` of a run whose base key data is `rng` (uint32 `[2]`)."""
  return jax.random.fold_in(jax.random.wrap_key_data(rng), step)
