"""RMSNorm whose gain is predicted from a conditioning vector (the time step)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding


class AdaptiveRMSNorm(nn.Module):
  """y = x * rsqrt(mean(x^2) + eps) * (W c + b), scale only.

  Initialized to W = 0, b = 1 (the identity gain the reference intends; its
  Hugging Face `post_init` accidentally re-draws W ~ N(0, 0.02), b = 0, which
  starts training with near-zero gains).

  Attributes:
    eps: added to the mean square.
    dtype: output dtype.
    param_dtype: dtype of W and b.
  """
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """x: `[batch, length, embed]`; cond: `[batch, cond_dim]` -> `[batch, length, embed]`."""
    features = x.shape[-1]
    gain = nn.Dense(
        features,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=sharding.partitioned(nn.initializers.zeros, ("embed", "norm")),
        bias_init=sharding.partitioned(nn.initializers.ones, ("norm",)),
        name="to_weight",
    )(cond.astype(jnp.float32))
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(mean_square + self.eps)
    return (y * gain[:, None, :]).astype(self.dtype)
