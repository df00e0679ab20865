"""The stage-1 Metis model: p(x0 | xt, prompt[, phones][, frame features]) over SSL tokens.

Inputs are token ids with a boolean "is masked" flag per position: masked
positions get the learned mask embedding, the others their token embedding.
Prompt positions are simply unmasked tokens; padding is excluded with `valid`.
"""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from metis_jax.models import masking
from metis_jax.parallel import sharding
from metis_jax.nn import adapter as adapter_lib
from metis_jax.nn import lora as lora_lib
from metis_jax.nn import mlp, transformer

EMBED_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class MetisConfig:
  """Static model description; built from `config.model` by `from_config`."""
  backbone: transformer.BackboneConfig
  vocab_size: int = 8192
  use_phone_cond: bool = False
  phone_vocab_size: int = 1024
  phone_pad_id: int = 1023
  cond_feature_dim: int = 0
  adapter_gated: bool = True
  # LoRA on the backbone's linear maps (rank 0: none, no LoRA parameters).
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = lora_lib.TARGETS

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "MetisConfig":
    backbone = transformer.BackboneConfig.from_config(model)
    return cls(backbone=backbone, vocab_size=model.vocab_size, use_phone_cond=model.use_phone_cond,
               phone_vocab_size=model.phone_vocab_size, phone_pad_id=model.phone_pad_id,
               cond_feature_dim=model.cond_feature_dim, adapter_gated=model.adapter_gated,
               lora_rank=int(model.get("lora_rank", 0)),
               lora_alpha=float(model.get("lora_alpha", 0.0)),
               lora_dropout=float(model.get("lora_dropout", 0.0)),
               lora_targets=lora_lib.parse_targets(model.get("lora_targets", lora_lib.TARGETS)))

  def __post_init__(self):
    _ = self.lora  # validates the LoRA fields

  @property
  def hidden_size(self) -> int:
    return self.backbone.hidden_size

  @property
  def lora(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout,
                               tuple(self.lora_targets))


def compact_positions(valid: jax.Array) -> jax.Array:
  """Numbers the valid positions of each row 0, 1, 2, ... skipping padding.

  `[batch, length]` bool -> `[batch, length]` int32. With these RoPE phases a
  sample's output does not depend on how much padding sits between its
  segments (phones, prompt, target), so batched and single decoding agree.
  """
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def logits_head(cfg: MetisConfig) -> nn.Dense:
  """The output layer `to_logits`: embed -> vocab, with bias, in the compute dtype."""
  return nn.Dense(cfg.vocab_size, dtype=cfg.backbone.compute_dtype,
                  param_dtype=cfg.backbone.weight_dtype,
                  kernel_init=sharding.partitioned(EMBED_INIT, ("embed", "vocab")),
                  bias_init=sharding.partitioned(nn.initializers.zeros, ("vocab",)))


def _float_logits(out: jax.Array) -> jax.Array:
  return sharding.constrain(out.astype(jnp.float32), sharding.BATCH_LENGTH_VOCAB)


class MetisModel(nn.Module):
  """Token/mask embeddings, optional phone prefix and adapter, backbone, logits head."""
  config: MetisConfig

  def setup(self):
    cfg = self.config
    h = cfg.hidden_size
    wdtype, cdtype = cfg.backbone.weight_dtype, cfg.backbone.compute_dtype
    self.token_embed = nn.Embed(cfg.vocab_size, h, dtype=cdtype, param_dtype=wdtype,
                                embedding_init=sharding.partitioned(EMBED_INIT, ("vocab", "embed")))
    self.mask_embedding = self.param(
        "mask_embedding", sharding.partitioned(EMBED_INIT, ("embed",)), (h,), wdtype)
    if cfg.use_phone_cond:
      self.phone_embed = nn.Embed(cfg.phone_vocab_size, h, dtype=cdtype, param_dtype=wdtype,
                                  embedding_init=sharding.partitioned(EMBED_INIT, ("vocab", "embed")))
      self.phone_mlp = mlp.ConditionMLP(cfg.backbone.mlp_ratio * h, h, dtype=cdtype, param_dtype=wdtype)
    if cfg.cond_feature_dim:
      self.adapter = adapter_lib.ConditionAdapter(cfg.backbone.mlp_ratio * h, h, cfg.adapter_gated,
                                                  dtype=cdtype, param_dtype=wdtype)
    self.backbone = transformer.Backbone(dataclasses.replace(cfg.backbone, lora=cfg.lora))
    self.to_logits = logits_head(cfg)

  def embed_tokens(self, tokens: jax.Array, is_masked: jax.Array) -> jax.Array:
    """`[batch, length]` ids and mask flags -> `[batch, length, embed]`."""
    emb = self.token_embed(tokens)
    return jnp.where(is_masked[..., None], self.mask_embedding.astype(emb.dtype), emb)

  def hidden_states(self, tokens: jax.Array, is_masked: jax.Array, valid: jax.Array,
                    t: jax.Array, phones: Optional[jax.Array] = None,
                    phone_valid: Optional[jax.Array] = None,
                    features: Optional[jax.Array] = None,
                    positions: Optional[jax.Array] = None,
                    segment_ids: Optional[jax.Array] = None,
                    condition_rows: Optional[jax.Array] = None,
                    phone_prefix: Optional[jax.Array] = None,
                    adapter_out: Optional[jax.Array] = None) -> jax.Array:
    """Backbone output over the token positions.

    Args:
      tokens: `[batch, length]` SSL token ids (any value where masked or padded).
      is_masked: `[batch, length]` bool, True where the mask embedding is used.
      valid: `[batch, length]` bool, False at padding.
      t: `[batch]` mask-ratio time step.
      phones: optional `[batch, phone_length]` phone ids (models with phones).
      phone_valid: `[batch, phone_length]` bool, False at phone padding.
      features: optional `[batch, length, cond_feature_dim]` frame-level
        condition aligned with `tokens` (models with an adapter).
      positions: optional `[batch, phone_length + length]` RoPE positions;
        default `compact_positions` of the whole valid mask. (The reference's
        forward numbers padded phone slots too: pass `arange` to match it.)
      segment_ids: optional `[batch, phone_length + length]` ids of packed
        sequences (attention stays inside a segment).
      condition_rows: optional `[batch]` bool, False on rows without a
        frame-level condition (TTS rows of an Omni batch): the adapter adds
        exactly 0 there, as it does when decoding those tasks.
      phone_prefix: optional `[batch, phone_length, embed]`, `phone_prefix(phones)`
        computed beforehand (instead of `phones`; give `phone_valid`). A
        decoder computes it once, not at every step; phone_length may be 0
        (no prefix: the unconditional pass of guidance).
      adapter_out: optional `[batch, length, embed]`, `adapter_output(features)`
        computed beforehand (instead of `features`).

    Returns:
      `[batch, length, embed]` hidden states after the final norm, phone
      prefix removed.
    """
    cfg = self.config
    x = self.embed_tokens(tokens, is_masked)
    if cfg.cond_feature_dim:
      if (features is None) == (adapter_out is None):
        raise ValueError("this model has a condition adapter: pass `features` (or `adapter_out`)")
      added = (self.adapter_output(features) if adapter_out is None else adapter_out).astype(x.dtype)
      if condition_rows is not None:
        added = jnp.where(condition_rows[:, None, None], added, jnp.zeros_like(added))
      x = x + added
    elif features is not None or adapter_out is not None:
      raise ValueError("`features` given, but the model has no adapter (cond_feature_dim = 0)")
    prefix = 0
    if cfg.use_phone_cond:
      if phone_prefix is None:
        if phones is None:
          raise ValueError("this model is phone-conditioned: pass `phones` and `phone_valid`")
        if phone_valid is None:
          phone_valid = phones != cfg.phone_pad_id
        phone_prefix = self.phone_prefix(phones)
      elif phones is not None or phone_valid is None:
        raise ValueError("with `phone_prefix`, pass `phone_valid` and no `phones`")
      prefix = phone_prefix.shape[1]
      x = jnp.concatenate([phone_prefix.astype(x.dtype), x], axis=1)
      valid = jnp.concatenate([phone_valid.astype(bool), valid.astype(bool)], axis=1)
    elif phones is not None or phone_prefix is not None:
      raise ValueError("`phones` given, but the model has no phone condition")
    valid = valid.astype(bool)
    if positions is None:
      positions = compact_positions(valid)
    h = self.backbone(x, t, positions, valid, segment_ids)
    return h[:, prefix:]

  def phone_prefix(self, phones: jax.Array) -> jax.Array:
    """`[batch, phone_length]` phone ids -> `[batch, phone_length, embed]` prefix embeddings."""
    return self.phone_mlp(self.phone_embed(phones))

  def adapter_output(self, features: jax.Array) -> jax.Array:
    """`[batch, length, cond_feature_dim]` frames -> `[batch, length, embed]`, the adapter's
    addition to the input embeddings (compute dtype)."""
    dtype = self.config.backbone.compute_dtype
    return self.adapter(features.astype(dtype)).astype(dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[batch, length, embed]` -> float32 `[batch, length, vocab]`."""
    return _float_logits(self.to_logits(hidden))

  def __call__(self, tokens, is_masked, valid, t, phones=None, phone_valid=None,
               features=None, positions=None, segment_ids=None, condition_rows=None):
    """Returns (hidden `[batch, length, embed]`, logits `[batch, length, vocab]`)."""
    hidden = self.hidden_states(tokens, is_masked, valid, t, phones, phone_valid, features,
                                positions, segment_ids, condition_rows)
    return hidden, self.logits(hidden)

  def init_inputs(self, batch: int = 1, length: int = 8):
    """Dummy arguments for `init` (shapes only matter for parameter shapes)."""
    cfg = self.config
    args = dict(tokens=jnp.zeros((batch, length), jnp.int32),
                is_masked=jnp.zeros((batch, length), bool),
                valid=jnp.ones((batch, length), bool), t=jnp.ones((batch,), jnp.float32))
    if cfg.use_phone_cond:
      args["phones"] = jnp.zeros((batch, 4), jnp.int32)
      args["phone_valid"] = jnp.ones((batch, 4), bool)
    if cfg.cond_feature_dim:
      args["features"] = jnp.zeros((batch, length, cfg.cond_feature_dim), jnp.float32)
    return args


def _head_logits(cfg: MetisConfig, head, hidden: jax.Array) -> jax.Array:
  """`MetisModel.logits` from the head's parameters alone (`params['to_logits']`)."""
  return _float_logits(logits_head(cfg).apply({"params": head}, hidden))


def training_loss(params, model: MetisModel, tokens: jax.Array, valid: jax.Array,
                  corruption: masking.TrainingMask, *, rngs=None,
                  chunk_size: int = masking.DEFAULT_CHUNK, **inputs):
  """Masked cross-entropy of the SSL tokens, computed from the hidden states.

  Equal to `masking.masked_cross_entropy(model.apply(...)[1], tokens,
  corruption.is_masked & valid)`, without the float32 `[batch, length, vocab]`
  logits (`masking.chunked_cross_entropy`).

  Args:
    params: the model's parameters.
    tokens: `[batch, length]` SSL tokens (also the targets).
    valid: `[batch, length]` bool.
    corruption: the `masking.TrainingMask` (is_masked, t).
    rngs: optional flax RNGs (LoRA dropout).
    chunk_size: positions per row per logits chunk.
    **inputs: `phones`, `phone_valid`, `features`, `positions`, `segment_ids`
      for `MetisModel.hidden_states`.

  Returns:
    (mean CE, accuracy, number of scored tokens), as `masking.masked_cross_entropy`.
  """
  valid = valid.astype(bool)
  hidden = model.apply({"params": params}, tokens, corruption.is_masked, valid, corruption.t,
                       method=MetisModel.hidden_states, rngs=rngs, **inputs)
  return masking.chunked_cross_entropy(functools.partial(_head_logits, model.config),
                                       params["to_logits"], hidden, tokens,
                                       corruption.is_masked & valid, chunk_size)


def init_params(model: MetisModel, rng: jax.Array):
  """Unboxed parameter pytree (logical-axis metadata stripped)."""
  variables = model.init(rng, **model.init_inputs())
  return nn.unbox(variables["params"])


def merge_lora(params, config: MetisConfig):
  """Params with every LoRA folded into its kernel (W + alpha/r A B), LoRA leaves removed.

  Apply the result with `dataclasses.replace(config, lora_rank=0)`: it costs
  exactly the base model.
  """
  return lora_lib.merge_lora(params, config.lora)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
