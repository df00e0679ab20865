"""Bidirectional multi-head self-attention with RoPE and a key-padding mask."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding
from metis_jax.nn import lora as lora_lib
from metis_jax.nn import rope

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def attention_mask(valid: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Boolean `[batch, 1, q_length, k_length]` (or `[batch, 1, 1, k_length]`) mask.

  Args:
    valid: `[batch, length]`, True where a key is a real token.
    segment_ids: optional `[batch, length]` ids of packed sequences; queries
      then only see keys of their own segment.
  """
  if segment_ids is None:
    return valid[:, None, None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & valid[:, None, :])[:, None, :, :]


class Projection(nn.Module):
  """`y = einsum(x, kernel)` with a kernel created at its full rank.

  Same parameter (`kernel`, no bias) as `nn.DenseGeneral`, but DenseGeneral
  draws a flat 2-D kernel and reshapes it; with logically partitioned
  initializers its unbox applies the 3 logical names to the 2-D value, which
  fails whenever a mesh and axis rules are active (flax also re-runs the
  initializer under eval_shape in `apply` to check shapes, so even the
  training forward pass failed under a mesh).

  Attributes:
    features: output feature shape, e.g. (heads, head_dim) or (embed,).
    contract: number of trailing input axes to contract (1 for q/k/v, 2 for
      the output projection over (heads, head_dim)).
    logical_axes: logical names of the kernel, input axes then output axes.
    lora_rank: rank of a LoRA on this map (0: none, and no LoRA parameters).
    lora_scale: alpha / r of that LoRA.
    lora_dropout: dropout on the LoRA input (only with a `dropout` RNG).
  """
  features: tuple[int, ...]
  contract: int
  logical_axes: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0
  lora_scale: float = 0.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., *contracted]` -> `[..., *features]`."""
    in_shape = x.shape[x.ndim - self.contract:]
    kernel = self.param("kernel", sharding.partitioned(KERNEL_INIT, self.logical_axes),
                        in_shape + tuple(self.features), self.param_dtype)
    lora_in = x
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    axes = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
    y = jax.lax.dot_general(x, kernel, (axes, ((), ())))
    if self.lora_rank:
      y = y + lora_lib.lora_update(
          self, lora_in, tuple(self.logical_axes[:self.contract]), tuple(self.features),
          tuple(self.logical_axes[self.contract:]), self.lora_rank, self.lora_scale,
          self.lora_dropout, self.dtype, self.param_dtype)
    return y


def choose_implementation(requested: Optional[str], dtype) -> Optional[str]:
  """The `jax.nn.dot_product_attention` kernel to use.

  An explicit request wins. Otherwise a GPU in bfloat16/float16 takes the
  fused cuDNN kernel: JAX's own choice is the unfused XLA one, which
  materializes the [batch, heads, T, T] scores (metis_base train step on an
  H100, 16 x 1024 tokens: 27% MFU with XLA, 40% with cuDNN;
  benchmarks/train.py). Elsewhere JAX chooses.
  """
  if requested:
    return requested
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return None


class SelfAttention(nn.Module):
  """q/k/v/o projections without bias, RoPE on q and k, no causal mask.

  Attributes:
    num_heads: number of heads; head_dim = embed // num_heads.
    rope_theta: RoPE base.
    implementation: `jax.nn.dot_product_attention` implementation
      (None = `choose_implementation`'s default, 'xla', 'cudnn').
    lora: LoRA on q/k/v/o (`q_proj`... among its targets); default none.
  """
  num_heads: int
  rope_theta: float = 10000.0
  implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Attends over all valid keys.

    Args:
      x: `[batch, length, embed]`.
      positions: `[batch, length]` RoPE positions.
      mask: boolean, broadcastable to `[batch, heads, length, length]`.

    Returns:
      `[batch, length, embed]`.
    """
    embed = x.shape[-1]
    head_dim = embed // self.num_heads
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    adapted = lambda target: dict(lora_rank=self.lora.rank_for(target), lora_scale=self.lora.scale,
                                  lora_dropout=self.lora.dropout)
    projection = lambda name, target: Projection(
        (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), name=name, **dtypes,
        **adapted(target))
    q = rope.apply_rope(projection("query", "q_proj")(x), positions, self.rope_theta)
    k = rope.apply_rope(projection("key", "k_proj")(x), positions, self.rope_theta)
    v = projection("value", "v_proj")(x)
    q = sharding.constrain(q, sharding.BATCH_LENGTH_HEADS_KV)
    k = sharding.constrain(k, sharding.BATCH_LENGTH_HEADS_KV)
    v = sharding.constrain(v, sharding.BATCH_LENGTH_HEADS_KV)
    implementation = choose_implementation(self.implementation, q.dtype)
    if implementation == "cudnn":
      # The fused kernel takes the mask as a bias of full [batch, 1, q, k] shape (it
      # rejects a broadcast key-padding mask); valid slots need not be a prefix (phone
      # padding sits between phones and speech), so sequence lengths would not do.
      mask = jnp.broadcast_to(mask, (mask.shape[0], 1, x.shape[1], x.shape[1]))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    out = sharding.constrain(out, sharding.BATCH_LENGTH_HEADS_KV)
    out = Projection((embed,), 2, ("heads", "kv", "embed"), name="out", **dtypes,
                     **adapted("o_proj"))(out)
    return sharding.constrain(out, sharding.BATCH_LENGTH_EMBED)
