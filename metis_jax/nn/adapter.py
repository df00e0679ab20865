"""Frame-level condition adapter of the fine-tuned Metis tasks (VC, SE, TSE, L2S)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


class ConditionAdapter(nn.Module):
  """gate * out_linear(silu(in_linear(c))), added to the input embeddings.

  With `gated`, `gate_scale` is a learned scalar initialized to 0, so a new
  adapter is an exact no-op on the pre-trained model. L2S uses no gate.

  Attributes:
    hidden_dim: inner width (4H).
    out_dim: model width H.
    gated: multiply by the zero-initialized scalar gate.
  """
  hidden_dim: int
  out_dim: int
  gated: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """`[batch, length, cond_dim]` -> `[batch, length, out_dim]`."""
    h = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=sharding.partitioned(KERNEL_INIT, ("cond_features", "mlp")),
                 bias_init=sharding.partitioned(nn.initializers.zeros, ("mlp",)),
                 name="in_linear")(features)
    out = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=sharding.partitioned(KERNEL_INIT, ("mlp", "embed")),
                   bias_init=sharding.partitioned(nn.initializers.zeros, ("embed",)),
                   name="out_linear")(nn.silu(h))
    if self.gated:
      gate = self.param("gate_scale", nn.initializers.zeros, (), self.param_dtype)
      out = out * gate.astype(out.dtype)
    return out
