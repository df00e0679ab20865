"""Rotary position embedding, Llama's rotate-half convention."""

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """`[head_dim // 2]` float32: theta^(-2i / head_dim)."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates query or key vectors by their positions.

  Args:
    x: `[batch, length, heads, head_dim]`.
    positions: `[batch, length]` integer positions.
    theta: base frequency (1e4 in Metis).

  Returns:
    `[batch, length, heads, head_dim]` in the dtype of `x`; the rotation is
    computed in float32. Pairs (i, i + head_dim/2) rotate together.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(head_dim, theta)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
