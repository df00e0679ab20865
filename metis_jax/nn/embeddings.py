"""Sinusoidal embedding of the mask-ratio time step."""

import math

import jax
import jax.numpy as jnp


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """[sin(t f), cos(t f)] with f_k = exp(-k ln(1e4) / (dim/2 - 1)).

  Args:
    t: `[batch]` time steps in [0, 1], used raw (not scaled by 1000).
    dim: embedding width (even).

  Returns:
    `[batch, dim]` float32, sines first.
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
