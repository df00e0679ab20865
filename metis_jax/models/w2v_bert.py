"""w2v-BERT 2.0 (Hugging Face `Wav2Vec2BertModel`) conformer encoder in Flax.

Only what Metis needs: the feature projection and the first `output_layer`
conformer blocks (17 of the 24 released ones), whose output is Hugging Face's
`hidden_states[output_layer]` (entry 0 is the projection output, entry i the
output of block i). No adapter, no intermediate FFN, no SpecAugment masking
(`masked_spec_embed` is training-only and not part of this model).

Per block (`Wav2Vec2BertEncoderLayer`, pre-LN, dropout off):

  x = x + 0.5 * FFN1(LN x)                              FFN: Linear, swish, Linear
  x = x + MHSA(LN x)          scores = (q.k + q.E[clip(j - i, -64, 8) + 64]) / sqrt(d)
                              ("relative_key": a learned [73, head_dim] table
                              dotted with the query, scaled like q.k), key-padding
                              mask; q/k/v/out Linears with bias
  x = x + Conv(x)             LN, zero padded frames, pointwise H -> 2H (no bias),
                              GLU, causal depthwise k31 (left pad 30, no bias),
                              LN, swish, pointwise H -> H (no bias)
  x = LN_final(x + 0.5 * FFN2(LN x))

The encoder zeroes padded frames of the projection output first. `mask`
follows Hugging Face's `attention_mask` (True = real frame; see `fbank`:
for an odd frame count the last, half-padded token is False). Outputs at
padded positions are computed (as in Hugging Face) but meaningless.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding
from metis_jax.nn.attention import Projection

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class W2VBertConfig:
  """Static description of the encoder (hashable, so modules can hold it).

  Defaults are `facebook/w2v-bert-2.0` as used by Metis/MaskGCT.

  Attributes:
    input_dim: stacked filterbank width (2 x 80).
    hidden_size: model width H.
    num_layers: blocks in the released model (weight files may hold them all).
    output_layer: blocks actually built and run; the output is
      `hidden_states[output_layer]` (17 in Metis).
    num_heads: attention heads (head_dim = H / num_heads).
    intermediate_size: FFN inner width.
    conv_kernel_size: causal depthwise convolution width.
    left_max_position / right_max_position: relative distances (key - query)
      are clipped to [-left, +right]; the table has left + right + 1 rows.
    layer_norm_eps: every LayerNorm's epsilon.
    dtype: compute dtype (LayerNorm statistics and softmax stay in float32).
    param_dtype: parameter dtype.
    scan_layers: stack the blocks with `nn.scan` (parameters carry a leading
      `layers` axis; faster compilation) or unroll them (`layers_{i}`).
  """
  input_dim: int = 160
  hidden_size: int = 1024
  num_layers: int = 24
  output_layer: int = 17
  num_heads: int = 16
  intermediate_size: int = 4096
  conv_kernel_size: int = 31
  left_max_position: int = 64
  right_max_position: int = 8
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if not 1 <= self.output_layer <= self.num_layers:
      raise ValueError(f"output_layer {self.output_layer} must be in [1, num_layers={self.num_layers}]")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_positions(self) -> int:
    return self.left_max_position + self.right_max_position + 1

  @classmethod
  def small(cls, **overrides) -> "W2VBertConfig":
    """A tiny encoder for tests: width 64, 4 heads, 3 blocks (all computed), FFN 128, k31."""
    base = dict(hidden_size=64, num_heads=4, num_layers=3, output_layer=3, intermediate_size=128)
    base.update(overrides)
    return cls(**base)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "W2VBertConfig":
    """From a Hugging Face `config.json` dict (only the fields this model uses).

    Raises ValueError for settings this port does not implement.
    """
    unsupported = {
        "position_embeddings_type": ("relative_key",), "hidden_act": ("swish", "silu"),
        "add_adapter": (False, None), "use_intermediate_ffn_before_adapter": (False, None),
        "feat_extract_norm": ("layer", None),
    }
    for key, allowed in unsupported.items():
      if key in hf and hf[key] not in allowed:
        raise ValueError(f"Wav2Vec2Bert config {key}={hf[key]!r} is not supported (only {allowed})")
    base = dict(
        input_dim=hf.get("feature_projection_input_dim", 160), hidden_size=hf.get("hidden_size", 1024),
        num_layers=hf.get("num_hidden_layers", 24), num_heads=hf.get("num_attention_heads", 16),
        intermediate_size=hf.get("intermediate_size", 4096),
        conv_kernel_size=hf.get("conv_depthwise_kernel_size", 31),
        left_max_position=hf.get("left_max_position_embeddings", 64),
        right_max_position=hf.get("right_max_position_embeddings", 8),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
    base["output_layer"] = min(17, base["num_layers"])
    base.update(overrides)
    return cls(**base)


def _layer_norm(cfg: W2VBertConfig, name: str) -> nn.LayerNorm:
  # Two-pass variance like PyTorch; statistics in float32.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype),
                      scale_init=sharding.partitioned(nn.initializers.ones, ("norm",)),
                      bias_init=sharding.partitioned(nn.initializers.zeros, ("norm",)), name=name)


def _dense(cfg: W2VBertConfig, features: int, axes: tuple, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=sharding.partitioned(KERNEL_INIT, axes),
                  bias_init=sharding.partitioned(nn.initializers.zeros, axes[-1:]), name=name)


def relative_position_bias(rel: jax.Array, left: int, right: int) -> jax.Array:
  """Spreads per-distance scores over (query, key) pairs without a gather.

  Args:
    rel: `[..., length, left + right + 1]`, entry r of query i is the score
      for distance (key - query) = r - left.
    left, right: clipping range of the distance.

  Returns:
    `[..., length, length]` with out[i, j] = rel[i, clip(j - i, -left, right) + left].
  """
  length = rel.shape[-2]
  lead = rel.shape[:-1]
  # R[i, d + length - 1] for every distance d in [-(length - 1), length - 1],
  # plus one pad column (so the skew below also works for length 1).
  n_left = max(0, length - 1 - left)
  n_right = max(0, length - 1 - right)
  lo, hi = max(-left, -(length - 1)), min(right, length - 1)
  parts = []
  if n_left:
    parts.append(jnp.broadcast_to(rel[..., :1], lead + (n_left,)))
  parts.append(rel[..., lo + left:hi + left + 1])
  if n_right:
    parts.append(jnp.broadcast_to(rel[..., -1:], lead + (n_right,)))
  parts.append(jnp.zeros(lead + (1,), rel.dtype))
  full = jnp.concatenate(parts, axis=-1)  # [..., length, 2 * length]
  # out[i, j] = full[i, j - i + length - 1] = flat[(length - 1) + i * (2 length - 1) + j].
  flat = full.reshape(rel.shape[:-2] + (2 * length * length,))
  flat = flat[..., length - 1:length - 1 + length * (2 * length - 1)]
  return flat.reshape(rel.shape[:-2] + (length, 2 * length - 1))[..., :length]


class FeedForward(nn.Module):
  """output_dense(swish(intermediate_dense(x))), with biases."""
  config: W2VBertConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, time, embed]` -> `[batch, time, embed]`."""
    cfg = self.config
    h = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate_dense")(x)
    h = sharding.constrain(nn.silu(h), sharding.BATCH_LENGTH_MLP)
    out = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output_dense")(h)
    return sharding.constrain(out, sharding.BATCH_LENGTH_EMBED)


class RelativeKeyAttention(nn.Module):
  """Multi-head self-attention with Hugging Face's "relative_key" position bias."""
  config: W2VBertConfig

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
    """x `[batch, time, embed]`, valid `[batch, time]` bool (keys) -> `[batch, time, embed]`."""
    cfg = self.config
    heads, head_dim = cfg.num_heads, cfg.head_dim
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def project(name):
      y = Projection((heads, head_dim), 1, ("embed", "heads", "kv"), dtype=dtype, param_dtype=param_dtype,
                     name=name)(x)
      bias = self.param(f"{name}_bias", sharding.partitioned(nn.initializers.zeros, ("heads", "kv")),
                        (heads, head_dim), param_dtype)
      return sharding.constrain(y + bias.astype(y.dtype), sharding.BATCH_LENGTH_HEADS_KV)

    q, k, v = project("query"), project("key"), project("value")
    table = self.param("distance_embedding", sharding.partitioned(KERNEL_INIT, (None, "kv")),
                       (cfg.num_positions, head_dim), param_dtype)
    scale = head_dim ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    rel = jnp.einsum("bqhd,rd->bhqr", q, table.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = (scores + relative_position_bias(rel, cfg.left_max_position, cfg.right_max_position)) * scale
    if valid is not None:
      scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = sharding.constrain(out, sharding.BATCH_LENGTH_HEADS_KV)
    out = Projection((cfg.hidden_size,), 2, ("heads", "kv", "embed"), dtype=dtype, param_dtype=param_dtype,
                     name="out")(out)
    bias = self.param("out_bias", sharding.partitioned(nn.initializers.zeros, ("embed",)), (cfg.hidden_size,),
                      param_dtype)
    return sharding.constrain(out + bias.astype(out.dtype), sharding.BATCH_LENGTH_EMBED)


class ConvModule(nn.Module):
  """LN, zero padding, pointwise GLU, causal depthwise conv, LN, swish, pointwise."""
  config: W2VBertConfig

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
    """x `[batch, time, embed]`, valid `[batch, time]` bool -> `[batch, time, embed]`."""
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = _layer_norm(cfg, "layer_norm")(x)
    if valid is not None:
      h = jnp.where(valid[..., None], h, 0.0).astype(h.dtype)
    # Kernel [embed, 2, embed]: [:, 0] is the GLU value half, [:, 1] the gate half.
    h = Projection((2, cfg.hidden_size), 1, ("embed", None, "mlp"), dtype=dtype, param_dtype=param_dtype,
                   name="pointwise_conv1")(h)
    h = h[..., 0, :] * nn.sigmoid(h[..., 1, :])
    h = sharding.constrain(h, sharding.BATCH_LENGTH_MLP)
    kernel = self.param("depthwise_conv", sharding.partitioned(KERNEL_INIT, (None, "mlp")),
                        (cfg.conv_kernel_size, cfg.hidden_size), param_dtype)
    h = jnp.pad(h, ((0, 0), (cfg.conv_kernel_size - 1, 0), (0, 0)))
    h = jax.lax.conv_general_dilated(
        h, kernel.astype(h.dtype)[:, None, :], window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=cfg.hidden_size)
    h = nn.silu(_layer_norm(cfg, "depthwise_layer_norm")(h))
    h = sharding.constrain(h, sharding.BATCH_LENGTH_MLP)
    out = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "pointwise_conv2", use_bias=False)(h)
    return sharding.constrain(out, sharding.BATCH_LENGTH_EMBED)


class ConformerBlock(nn.Module):
  """One `Wav2Vec2BertEncoderLayer` (inference: no dropout)."""
  config: W2VBertConfig

  @nn.compact
  def __call__(self, x: jax.Array, valid: Optional[jax.Array]):
    """x `[batch, time, embed]`, valid `[batch, time]` -> (x, None) (scan-friendly)."""
    cfg = self.config
    x = x + 0.5 * FeedForward(cfg, name="ffn1")(_layer_norm(cfg, "ffn1_layer_norm")(x))
    x = x + RelativeKeyAttention(cfg, name="self_attn")(_layer_norm(cfg, "self_attn_layer_norm")(x), valid)
    x = x + ConvModule(cfg, name="conv_module")(x, valid)
    x = x + 0.5 * FeedForward(cfg, name="ffn2")(_layer_norm(cfg, "ffn2_layer_norm")(x))
    x = _layer_norm(cfg, "final_layer_norm")(x)
    return sharding.constrain(x, sharding.BATCH_LENGTH_EMBED), None


class W2VBert(nn.Module):
  """Feature projection + the first `output_layer` conformer blocks."""
  config: W2VBertConfig

  @nn.compact
  def __call__(self, features: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Hugging Face's `hidden_states[output_layer]`.

    Args:
      features: `[batch, time, 160]` stacked filterbank features (`fbank`).
      mask: `[batch, time]` bool, True at real frames (Hugging Face's
        `attention_mask`); None means no padding.

    Returns:
      `[batch, time, hidden]` in the compute dtype.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = _layer_norm(cfg, "feature_layer_norm")(features.astype(jnp.float32))
    h = _dense(cfg, cfg.hidden_size, ("cond_features", "embed"), "feature_projection")(h).astype(dtype)
    if mask is not None:
      mask = mask.astype(bool)
      h = jnp.where(mask[..., None], h, 0.0).astype(dtype)
    h = sharding.constrain(h, sharding.BATCH_LENGTH_EMBED)
    if cfg.scan_layers:
      stack = nn.scan(ConformerBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,), length=cfg.output_layer,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      h, _ = stack(cfg, name="layers")(h, mask)
    else:
      for i in range(cfg.output_layer):
        h, _ = ConformerBlock(cfg, name=f"layers_{i}")(h, mask)
    return h


def init_params(config: W2VBertConfig, rng: jax.Array, time: int = 8) -> dict:
  """Random parameters (unboxed, no logical-partitioning metadata); one jitted init."""
  model = W2VBert(config)
  features = jnp.zeros((1, time, config.input_dim), jnp.float32)
  return jax.jit(lambda r: nn.meta.unbox(model.init(r, features)["params"]))(rng)


def abstract_params(config: W2VBertConfig) -> dict:
  """Parameter shapes (`jax.ShapeDtypeStruct` tree) without allocating."""
  return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
