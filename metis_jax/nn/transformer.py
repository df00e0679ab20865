"""The Metis backbone: Llama blocks with time-adaptive RMSNorm, bidirectional.

Shared by the stage-1 model (SSL tokens) and S2A (acoustic tokens).
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding
from metis_jax.nn import attention, embeddings, mlp, norms, packing
from metis_jax.nn import lora as lora_lib

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """Static description of the backbone (hashable, so modules can hold it)."""
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = ""
  # Left-pack each row's valid slots before the blocks (`nn.packing`). None:
  # when the attention kernel takes key lengths rather than a mask (cuDNN,
  # splash); True/False force it (outputs are the same either way).
  pack_rows: Optional[bool] = None
  # LoRA on the blocks' linear maps (set by the model config; rank 0 = none).
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  @classmethod
  def from_config(cls, model) -> "BackboneConfig":
    """From `config.model` (the fields of `config_base.model_config`)."""
    return cls(hidden_size=model.hidden_size, num_layers=model.num_layers,
               num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, rope_theta=model.rope_theta,
               norm_eps=model.norm_eps, dtype=model.dtype, param_dtype=model.param_dtype,
               scan_layers=model.scan_layers, remat_policy=model.remat_policy,
               attention_impl=model.attention_impl)

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in ("",) + attention.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of "
                       f"{('',) + attention.IMPLEMENTATIONS}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def packs_rows(self, backend: Optional[str] = None) -> bool:
    """Whether the backbone left-packs its rows (see `pack_rows`) on `backend` (default: traced for)."""
    if self.pack_rows is not None:
      return self.pack_rows
    chosen = attention.choose_implementation(self.attention_impl or None, self.compute_dtype, backend)
    return attention.takes_lengths(chosen)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x, c)); x + swiglu(norm(x, c))."""
  config: BackboneConfig

  @nn.compact
  def __call__(self, x, cond, positions, mask, kv_lengths=None):
    """x `[batch, length, embed]`, cond `[batch, embed]` -> (x, None) (scan-friendly).

    The key padding is `mask` or, for left-packed rows, `kv_lengths` `[batch]`.
    """
    cfg = self.config
    dtypes = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    h = norms.AdaptiveRMSNorm(cfg.norm_eps, name="input_norm", **dtypes)(x, cond)
    h = attention.SelfAttention(cfg.num_heads, cfg.rope_theta, cfg.attention_impl or None,
                                name="attention", lora=cfg.lora, **dtypes)(h, positions, mask, kv_lengths)
    x = x + h
    h = norms.AdaptiveRMSNorm(cfg.norm_eps, name="post_attention_norm", **dtypes)(x, cond)
    h = mlp.SwiGLU(cfg.mlp_ratio * cfg.hidden_size, name="mlp", lora=cfg.lora, **dtypes)(h)
    x = sharding.constrain(x + h, sharding.BATCH_LENGTH_EMBED)
    return x, None


class Backbone(nn.Module):
  """Time-step MLP, N blocks, final adaptive norm.

  The same conditioning vector c = MLP(sinusoid(t)) feeds every norm,
  the final one included.
  """
  config: BackboneConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, positions: jax.Array, valid: jax.Array,
               segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Runs the stack.

    Args:
      x: `[batch, length, embed]` input embeddings.
      t: `[batch]` mask-ratio time step in [0, 1].
      positions: `[batch, length]` RoPE positions.
      valid: `[batch, length]` bool, False at padding (never attended to).
      segment_ids: optional `[batch, length]` ids of packed sequences.

    When `config.packs_rows()` (fused kernels), each row's valid slots are
    moved to the front for the blocks and back after the final norm; the
    outputs at valid slots are those of the masked path.

    Returns:
      `[batch, length, embed]` hidden states after the final norm.
    """
    cfg = self.config
    dtypes = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    cond = mlp.ConditionMLP(cfg.mlp_ratio * cfg.hidden_size, cfg.hidden_size, name="time_mlp",
                            dtype=jnp.float32, param_dtype=cfg.weight_dtype)(
                                embeddings.timestep_embedding(t, cfg.hidden_size))
    x = x.astype(cfg.compute_dtype)
    packed = None
    if segment_ids is None and cfg.packs_rows():
      # Valid slots first, so the padding is a per-row suffix the fused kernels take
      # as key lengths; positions travel with their slots, so outputs do not change.
      packed = packing.left_pack(valid)
      x = packing.pack(x, packed)
      positions = jnp.take_along_axis(positions, packed.order, axis=1)
      mask, kv_lengths = None, packed.lengths
    else:
      mask, kv_lengths = attention.attention_mask(valid, segment_ids), None
    x = sharding.constrain(x, sharding.BATCH_LENGTH_EMBED)

    block = TransformerBlock
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 4, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers")(x, cond, positions, mask, kv_lengths)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, name=f"layers_{i}")(x, cond, positions, mask, kv_lengths)
    x = norms.AdaptiveRMSNorm(cfg.norm_eps, name="final_norm", **dtypes)(x, cond)
    if packed is not None:
      x = sharding.constrain(packing.unpack(x, packed), sharding.BATCH_LENGTH_EMBED)
    return x
