"""The masked token losses, per `config.model.kind`: model, batch keys, corruption, loss.

What `step.train_step` (the step of `masked_objective.MaskedObjective`, one
of the training loop's objectives, see `objective.py`), `aot_compile` and
`evaluate` corrupt and score; one class per kind:

  kind     batch (global arrays)                           corruption             loss
  'metis'  tokens int32 [B, T] (SSL), valid bool [B, T]    masking.TrainingMask   masked CE of the SSL tokens
  's2a'    tokens int32 [B, T] (SSL), valid bool [B, T],   target layer (one per  s2a.training_loss: masked
           acoustic_tokens int32 [B, T, Q]                 batch) + TrainingMask  CE of that codec layer

`draw(rng, batch)` makes the random corruption of a global batch, split in
two: `rows` (a pytree of `[B, ...]` arrays, cut into micro-batches with the
batch) and `shared` (scalars common to the whole batch, such as the S2A
target layer, so every micro-batch of a step trains the same layer).
`loss(params, batch, rows, shared)` returns sums (not means), so
micro-batches add up exactly to the whole batch. `targets(batch, shared)`
gives the scored ids (for evaluation, `train_eval`).
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from metis_jax import config_base
from metis_jax.models import masking
from metis_jax.models import metis
from metis_jax.models import s2a

Batch = dict[str, jax.Array]
# (sum of CE over scored tokens, (correct argmaxes, scored tokens)), float32 scalars.
LossSums = tuple[jax.Array, tuple[jax.Array, jax.Array]]
KINDS = ("metis", "s2a")


def kind_of(config: ml_collections.ConfigDict) -> str:
  """`config.model.kind`, checked."""
  kind = config.model.get("kind", "metis")
  if kind not in KINDS:
    raise ValueError(f"model.kind {kind!r} is not one of {KINDS}")
  return kind


def acoustic_layers(config: ml_collections.ConfigDict) -> int:
  """Codec layers a batch carries: `model.num_quantizers` for S2A, 0 for stage 1."""
  return int(config.model.num_quantizers) if kind_of(config) == "s2a" else 0


def cond_vocab_size(config: ml_collections.ConfigDict) -> int:
  """Vocabulary of the SSL tokens in a batch (the generated tokens for stage 1, the condition for S2A)."""
  return int(config.model.cond_vocab_size if kind_of(config) == "s2a" else config.model.vocab_size)


def batch_spec(config: ml_collections.ConfigDict, batch: int = 0,
               length: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch (default: `train.global_batch_size` x `train.seq_length`)."""
  shape = (batch or config.train.global_batch_size, length or config.train.seq_length)
  spec = {"tokens": jax.ShapeDtypeStruct(shape, np.int32), "valid": jax.ShapeDtypeStruct(shape, np.bool_)}
  q = acoustic_layers(config)
  if q:
    spec["acoustic_tokens"] = jax.ShapeDtypeStruct(shape + (q,), np.int32)
  return spec


def check_batch_keys(batch: Batch, keys: tuple[str, ...], kind: str) -> None:
  """Rejects batches this objective cannot train on correctly, with the reason."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing}; a model.kind={kind!r} batch has {list(keys)} "
                   "(tokens int32 [B, T], valid bool [B, T], acoustic_tokens int32 [B, T, Q])")
  if "segment_ids" in batch:
    raise NotImplementedError(
        "packed batches (segment_ids) are not supported by the masked objectives: the mask "
        "ratio t conditions every norm per *row* (model.cond is [batch, embed]) and the prompt "
        "is a per-row prefix, so several utterances in a row would share t and only the first "
        "would get a prompt. Use padded batches (one utterance per row).")


@dataclasses.dataclass(frozen=True)
class MetisObjective:
  """Stage 1: mask gamma(t) of the SSL tokens after a random prompt, predict them."""
  model: metis.MetisModel
  masking: masking.MaskingConfig
  kind: ClassVar[str] = "metis"
  batch_keys: ClassVar[tuple[str, ...]] = ("tokens", "valid")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "MetisObjective":
    return cls(metis.MetisModel(metis.MetisConfig.from_config(config.model)),
               masking.MaskingConfig.from_config(config.masking))

  def draw(self, rng: jax.Array, batch: Batch, layer=None) -> tuple[masking.TrainingMask, dict[str, jax.Array]]:
    """One mask draw for the whole global batch (accumulation does not change it); no `layer`."""
    if layer is not None:
      raise ValueError("the stage-1 objective has no codec layers")
    return masking.sample_training_mask(rng, batch["valid"].astype(bool), self.masking), {}

  def targets(self, batch: Batch, shared: dict) -> jax.Array:
    """The scored token ids `[B, T]`: the SSL tokens."""
    del shared
    return batch["tokens"]

  def loss(self, params: Any, batch: Batch, rows: masking.TrainingMask, shared: dict) -> LossSums:
    """Summed masked CE of a (micro-)batch: `tokens`/`valid` `[b, T]` (optional `positions`)."""
    del shared
    tokens, valid = batch["tokens"], batch["valid"].astype(bool)
    # From the hidden states, chunk by chunk: no [b, T, vocab] logits (metis.training_loss).
    mean_ce, accuracy, count = metis.training_loss(params, self.model, tokens, valid, rows,
                                                   positions=batch.get("positions"))
    return mean_ce * count, (accuracy * count, count)


@dataclasses.dataclass(frozen=True)
class S2AObjective:
  """S2A: one codec layer per batch (drawn by `model.layer_schedule`), masked by gamma(t).

  The corruption is `s2a.sample_training_corruption` and the loss
  `s2a.training_loss`: lower layers visible, the target layer masked with
  probability gamma(t) = sin(pi t / 2) outside the prompt, higher layers
  visible on the prompt only. The prompt and mask-ratio rules come from
  `config.masking` (the released S2A: no minimum ratio, prompt up to half the
  utterance; see configs/s2a_*.py).
  """
  model: s2a.S2AModel
  masking: masking.MaskingConfig
  kind: ClassVar[str] = "s2a"
  batch_keys: ClassVar[tuple[str, ...]] = ("tokens", "valid", "acoustic_tokens")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "S2AObjective":
    rules = masking.MaskingConfig.from_config(config.masking)
    released = masking.MaskingConfig.from_config(config_base.s2a_masking_config())
    if rules != released:
      logging.warning("S2A trains with masking %s; the released S2A rules are %s "
                      "(config.masking = config_base.s2a_masking_config())", rules, released)
    return cls(s2a.S2AModel(s2a.S2AConfig.from_config(config.model)), rules)

  def draw(self, rng: jax.Array, batch: Batch,
           layer=None) -> tuple[masking.TrainingMask, dict[str, jax.Array]]:
    """(per-row TrainingMask, {'target_layer': int32 scalar}); `layer` forces the layer (evaluation)."""
    drawn, mask = s2a.sample_training_corruption(rng, batch["valid"].astype(bool), self.model.config,
                                                 self.masking)
    return mask, {"target_layer": drawn if layer is None else jnp.asarray(layer, jnp.int32)}

  def targets(self, batch: Batch, shared: dict) -> jax.Array:
    """The scored token ids `[B, T]`: the target layer's codes."""
    return jnp.take(batch["acoustic_tokens"], shared["target_layer"], axis=-1)

  def predicted_layers(self) -> tuple[int, ...]:
    """The codec layers this model is trained to predict (1..Q-1 for the full model)."""
    cfg = self.model.config
    return tuple(range(cfg.first_predicted_layer, cfg.num_quantizers))

  def loss(self, params: Any, batch: Batch, rows: masking.TrainingMask, shared: dict) -> LossSums:
    """Summed masked CE of the target layer; `acoustic_tokens` `[b, T, Q]`, `tokens` (SSL) `[b, T]`."""
    mean_ce, accuracy, count = s2a.training_loss(
        params, self.model, batch["acoustic_tokens"], batch["tokens"], batch["valid"].astype(bool),
        shared["target_layer"], rows)
    return mean_ce * count, (accuracy * count, count)


OBJECTIVES = {"metis": MetisObjective, "s2a": S2AObjective}


def make_objective(config: ml_collections.ConfigDict):
  """The objective of `config.model.kind`."""
  return OBJECTIVES[kind_of(config)].from_config(config)


def vocab_size(objective) -> int:
  """Classes of the predicted tokens (chance accuracy is 1 / this)."""
  cfg = objective.model.config
  return cfg.codebook_size if isinstance(cfg, s2a.S2AConfig) else cfg.vocab_size

