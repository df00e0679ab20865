"""S2A: the masked generative acoustic model, SSL tokens -> codec tokens, layer by layer.

One model predicts one codec layer l at a time. Its input at each frame is
the sum of the embeddings of the lower layers (known), layer l's embedding or
the mask embedding, and for the higher layers their embedding on prompt
frames and the mask embedding elsewhere. The condition
cond_mlp(cond_emb(ssl token) + layer_emb(l)) is added frame-wise, and the
shared backbone (as in stage 1, no phone prefix) feeds the head of layer l.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metis_jax.models import masking
from metis_jax.parallel import sharding
from metis_jax.nn import mlp, transformer

EMBED_INIT = nn.initializers.normal(stddev=0.02)
LAYER_SCHEDULES = ("linear", "cosine", "uniform")


@dataclasses.dataclass(frozen=True)
class S2AConfig:
  """Static S2A description; built from `config.model` (kind 's2a') by `from_config`."""
  backbone: transformer.BackboneConfig
  codebook_size: int = 1024
  num_quantizers: int = 12
  cond_vocab_size: int = 8192
  predicts_first_layer: bool = False
  layer_schedule: str = "linear"

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "S2AConfig":
    backbone = transformer.BackboneConfig.from_config(model)
    return cls(backbone=backbone, codebook_size=model.vocab_size,
               num_quantizers=model.num_quantizers, cond_vocab_size=model.cond_vocab_size,
               predicts_first_layer=model.predicts_first_layer,
               layer_schedule=model.layer_schedule)

  def __post_init__(self):
    if self.layer_schedule not in LAYER_SCHEDULES:
      raise ValueError(f"layer_schedule {self.layer_schedule!r} is not one of {LAYER_SCHEDULES}")
    if not self.predicts_first_layer and self.num_quantizers < 2:
      raise ValueError("an S2A model that does not predict layer 0 needs num_quantizers >= 2")

  @property
  def hidden_size(self) -> int:
    return self.backbone.hidden_size

  @property
  def first_predicted_layer(self) -> int:
    return 0 if self.predicts_first_layer else 1


class S2AModel(nn.Module):
  """Per-layer token embeddings and heads (stacked), layer/mask/condition embeddings, backbone."""
  config: S2AConfig

  def setup(self):
    cfg = self.config
    h, q, c = cfg.hidden_size, cfg.num_quantizers, cfg.codebook_size
    wdtype, cdtype = cfg.backbone.weight_dtype, cfg.backbone.compute_dtype
    self.token_embedding = self.param(
        "token_embedding", sharding.partitioned(EMBED_INIT, ("quantizer", "vocab", "embed")),
        (q, c, h), wdtype)
    self.layer_embedding = self.param(
        "layer_embedding", sharding.partitioned(EMBED_INIT, ("quantizer", "embed")), (q, h), wdtype)
    self.mask_embedding = self.param(
        "mask_embedding", sharding.partitioned(EMBED_INIT, ("embed",)), (h,), wdtype)
    self.cond_embed = nn.Embed(cfg.cond_vocab_size, h, dtype=cdtype, param_dtype=wdtype,
                               embedding_init=sharding.partitioned(EMBED_INIT, ("vocab", "embed")))
    self.cond_mlp = mlp.ConditionMLP(cfg.backbone.mlp_ratio * h, h, dtype=cdtype, param_dtype=wdtype)
    self.backbone = transformer.Backbone(cfg.backbone)
    self.logits_kernel = self.param(
        "logits_kernel", sharding.partitioned(EMBED_INIT, ("quantizer", "embed", "vocab")),
        (q, h, c), wdtype)
    self.logits_bias = self.param(
        "logits_bias", sharding.partitioned(nn.initializers.zeros, ("quantizer", "vocab")), (q, c), wdtype)

  def _dtype(self):
    return self.config.backbone.compute_dtype

  def embed_layer(self, tokens: jax.Array, layer) -> jax.Array:
    """`[batch, time]` codes of codec layer `layer` (int or traced scalar) -> `[batch, time, embed]`."""
    table = jnp.take(self.token_embedding, layer, axis=0) if not isinstance(layer, int) \
        else self.token_embedding[layer]
    return jnp.take(table.astype(self._dtype()), tokens, axis=0)

  def mask_vector(self) -> jax.Array:
    return self.mask_embedding.astype(self._dtype())

  def training_inputs(self, tokens: jax.Array, layer, is_masked: jax.Array,
                      is_prompt: jax.Array) -> jax.Array:
    """Input embeddings for predicting `layer`.

    Args:
      tokens: `[batch, time, num_quantizers]` codec tokens.
      layer: the target layer (int or traced int32 scalar).
      is_masked: `[batch, time]` bool, target-layer positions replaced by the mask.
      is_prompt: `[batch, time]` bool, frames whose higher layers are visible.

    Returns:
      `[batch, time, embed]`.
    """
    mask = self.mask_vector()
    emb = self.embed_all_layers(tokens)
    x = jnp.zeros(tokens.shape[:2] + (self.config.hidden_size,), self._dtype())
    for q in range(self.config.num_quantizers):
      # Layer q shows its embedding below the target, off the mask at the target, on the
      # prompt above it; elsewhere the mask. Summed in layer order, as the reference does.
      shown = jnp.where(q < layer, True, jnp.where(q == layer, ~is_masked, is_prompt))
      x = x + jnp.where(shown[..., None], emb[:, :, q], mask)
    return x

  def embed_all_layers(self, tokens: jax.Array) -> jax.Array:
    """`[batch, time, num_quantizers]` codes -> `[batch, time, num_quantizers, embed]`.

    One gather from the `[Q * C, embed]` table (its gradient one scatter-add,
    not one per layer).
    """
    q, c, h = self.token_embedding.shape
    table = self.token_embedding.reshape(q * c, h).astype(self._dtype())
    return jnp.take(table, tokens + jnp.arange(q, dtype=tokens.dtype) * c, axis=0)

  def condition(self, cond_tokens: jax.Array, layer) -> jax.Array:
    """`[batch, time]` SSL tokens -> `[batch, time, embed]` condition of `layer`:
    cond_mlp(cond_emb(token) + layer_emb(layer)), added to the input embeddings."""
    layer_vec = jnp.take(self.layer_embedding, layer, axis=0).astype(self._dtype())
    return self.cond_mlp(self.cond_embed(cond_tokens) + layer_vec).astype(self._dtype())

  def hidden_states(self, x: jax.Array, cond_tokens: jax.Array, layer, valid: jax.Array,
                    t: jax.Array, positions=None, condition=None) -> jax.Array:
    """Backbone over input embeddings with the SSL condition of `layer`.

    Args:
      x: `[batch, time, embed]` input embeddings.
      cond_tokens: `[batch, time]` SSL tokens aligned with the frames.
      layer: target layer (int or traced scalar).
      valid: `[batch, time]` bool, False at padding.
      t: `[batch]` mask-ratio time step.
      positions: optional `[batch, time]` RoPE positions (default: valid
        frames numbered consecutively).
      condition: optional `[batch, time, embed]`, `condition(cond_tokens, layer)`
        computed beforehand (a decoder computes it once per layer, not per
        step); `cond_tokens` is then unused.

    Returns:
      `[batch, time, embed]`.
    """
    if condition is None:
      condition = self.condition(cond_tokens, layer)
    x = x.astype(self._dtype()) + condition.astype(self._dtype())
    valid = valid.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
    return self.backbone(x, t, positions, valid)

  def logits(self, hidden: jax.Array, layer) -> jax.Array:
    """`[batch, time, embed]` -> float32 `[batch, time, codebook]` from the head of `layer`."""
    head = layer_head({"logits_kernel": self.logits_kernel, "logits_bias": self.logits_bias}, layer)
    return head_logits(self._dtype(), head, hidden)

  def __call__(self, tokens, cond_tokens, layer, is_masked, is_prompt, valid, t, positions=None):
    """Training forward -> (hidden `[batch, time, embed]`, logits of `layer`)."""
    x = self.training_inputs(tokens, layer, is_masked, is_prompt)
    hidden = self.hidden_states(x, cond_tokens, layer, valid, t, positions)
    return hidden, self.logits(hidden, layer)

  def init_inputs(self, batch: int = 1, length: int = 8):
    q = self.config.num_quantizers
    return dict(tokens=jnp.zeros((batch, length, q), jnp.int32),
                cond_tokens=jnp.zeros((batch, length), jnp.int32), layer=jnp.int32(0),
                is_masked=jnp.zeros((batch, length), bool), is_prompt=jnp.zeros((batch, length), bool),
                valid=jnp.ones((batch, length), bool), t=jnp.ones((batch,), jnp.float32))


def layer_head(params, layer) -> dict[str, jax.Array]:
  """The head of codec layer `layer`: {'kernel': `[embed, codebook]`, 'bias': `[codebook]`}."""
  return {"kernel": jnp.take(params["logits_kernel"], layer, axis=0),
          "bias": jnp.take(params["logits_bias"], layer, axis=0)}


def head_logits(dtype, head: dict[str, jax.Array], hidden: jax.Array) -> jax.Array:
  """`[batch, time, embed]` -> float32 `[batch, time, codebook]` through one layer's `head`."""
  out = jnp.einsum("bth,hc->btc", hidden.astype(dtype), head["kernel"].astype(dtype))
  out = out.astype(jnp.float32) + head["bias"].astype(jnp.float32)
  return sharding.constrain(out, sharding.BATCH_LENGTH_VOCAB)


def init_params(model: S2AModel, rng: jax.Array):
  """Unboxed parameter pytree."""
  return nn.unbox(model.init(rng, **model.init_inputs())["params"])


def layer_weights(cfg: S2AConfig):
  """Probability of drawing each codec layer as the training target (`[num_quantizers]`)."""
  q = cfg.num_quantizers
  first = cfg.first_predicted_layer
  idx = np.arange(q)
  if cfg.layer_schedule == "uniform":
    w = np.ones(q)
  elif cfg.layer_schedule == "linear":
    w = (q - (idx - first)).astype(np.float64)
  else:  # cosine
    w = np.cos((idx - first) / q * np.pi / 2)
  w[:first] = 0
  return (w / w.sum()).astype(np.float32)


def sample_target_layer(rng: jax.Array, cfg: S2AConfig) -> jax.Array:
  """One target layer for the whole batch (int32 scalar), drawn by `layer_schedule`."""
  return jax.random.choice(rng, cfg.num_quantizers, p=jnp.asarray(layer_weights(cfg))).astype(jnp.int32)


def sample_training_corruption(rng: jax.Array, valid: jax.Array, cfg: S2AConfig,
                               masking_cfg: masking.MaskingConfig) -> tuple[jax.Array, masking.TrainingMask]:
  """Draws the target layer (one per batch) and the masking of that layer.

  The prompt prefix, the time steps and the masked positions follow
  `masking.sample_training_mask` with the S2A settings (no minimum mask
  ratio, prompt up to half the utterance: set them in `masking_cfg`).

  Args:
    rng: PRNG key.
    valid: `[batch, time]` bool.
    cfg: the S2A config.
    masking_cfg: a `masking.MaskingConfig`.

  Returns:
    (layer int32 scalar, TrainingMask).
  """
  rng_layer, rng_mask = jax.random.split(rng)
  return sample_target_layer(rng_layer, cfg), masking.sample_training_mask(rng_mask, valid, masking_cfg)


def training_loss(params, model: S2AModel, tokens: jax.Array, cond_tokens: jax.Array,
                  valid: jax.Array, layer: jax.Array,
                  corruption: masking.TrainingMask,
                  chunk_size: int = masking.DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked cross-entropy of the target layer, computed from the hidden states.

  Equal to `masking.masked_cross_entropy` of the `[batch, time, codebook]`
  logits of `layer`, without making them (`masking.chunked_cross_entropy`).

  Args:
    tokens: `[batch, time, num_quantizers]` codec tokens.
    cond_tokens: `[batch, time]` SSL tokens.
    valid: `[batch, time]` bool.
    layer: target layer (traced int32 scalar).
    corruption: the `masking.TrainingMask` of that layer.
    chunk_size: positions per row per logits chunk.

  Returns:
    (mean CE, accuracy, number of scored tokens), as `masking.masked_cross_entropy`.
  """
  def hidden_of(module):
    x = module.training_inputs(tokens, layer, corruption.is_masked, corruption.is_prompt)
    return module.hidden_states(x, cond_tokens, layer, valid, corruption.t)

  hidden = model.apply({"params": params}, method=hidden_of)
  targets = jnp.take(tokens, layer, axis=-1)
  project = functools.partial(head_logits, model.config.backbone.compute_dtype)
  return masking.chunked_cross_entropy(project, layer_head(params, layer), hidden, targets,
                                       corruption.is_masked & valid, chunk_size)
