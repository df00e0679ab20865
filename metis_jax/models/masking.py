"""The masked generative objective, shared by training and decoding.

A sample's valid tokens are split into a prompt prefix (always visible) and
the rest, of which a fraction gamma(t) is replaced by the mask embedding. The
loss is the cross-entropy on the masked, non-padding positions.
"""

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

SCHEDULES = ("sine", "cosine", "linear")


def mask_ratio(t, schedule: str = "sine"):
  """gamma(t): fraction of tokens masked at time t in [0, 1] (1 at t = 1, 0 at t = 0).

  Works on jax or numpy arrays (numpy in, numpy out), so decoding can tabulate
  the schedule on the host.
  """
  xp = np if isinstance(t, (np.ndarray, np.generic, float, int)) else jnp
  if schedule == "sine":
    return xp.sin(t * (math.pi / 2))
  if schedule == "cosine":
    return 1 - xp.cos(t * (math.pi / 2))
  if schedule == "linear":
    return t * 1
  raise ValueError(f"unknown mask schedule {schedule!r}; expected one of {SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """See `config_base.masking_config` for what each field means."""
  schedule: str = "sine"
  min_mask_ratio: float = 0.2
  prompt_min_divisor: int = 4
  prompt_min_tokens: int = 5
  prompt_max_fraction: float = 0.4
  prompt_drop_prob: float = 0.15

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "MaskingConfig":
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown mask schedule {self.schedule!r}; expected one of {SCHEDULES}")


@flax.struct.dataclass
class TrainingMask:
  """One draw of the training corruption for a batch.

  Attributes:
    t: `[batch]` time steps in [1e-5, 1].
    ratio: `[batch]` mask probability max(gamma(t), min_mask_ratio).
    prompt_lengths: `[batch]` visible prefix length (0 when dropped).
    is_prompt: `[batch, length]` bool.
    is_masked: `[batch, length]` bool; never on the prompt or padding, at
      least one per sample with a non-empty target.
  """
  t: jax.Array
  ratio: jax.Array
  prompt_lengths: jax.Array
  is_prompt: jax.Array
  is_masked: jax.Array


def sample_prompt_lengths(rng: jax.Array, lengths: jax.Array, cfg: MaskingConfig) -> jax.Array:
  """Per-sample prompt length in [min(T_i // d, m), floor(f T_i)), or 0 w.p. prompt_drop_prob.

  `lengths`: `[batch]` valid lengths T_i. Returns `[batch]` int32.
  """
  rng_len, rng_drop = jax.random.split(rng)
  low = jnp.minimum(lengths // cfg.prompt_min_divisor, cfg.prompt_min_tokens)
  high = jnp.floor(lengths.astype(jnp.float32) * cfg.prompt_max_fraction).astype(jnp.int32)
  high = jnp.maximum(high, low + 1)  # an empty range means "exactly `low`"
  prompt = jax.random.randint(rng_len, lengths.shape, low, high)
  drop = jax.random.bernoulli(rng_drop, cfg.prompt_drop_prob, lengths.shape)
  prompt = jnp.where(drop, 0, prompt)
  # Leave at least one target token whenever the sample has any token.
  return jnp.clip(prompt, 0, jnp.maximum(lengths - 1, 0)).astype(jnp.int32)


def sample_training_mask(rng: jax.Array, valid: jax.Array, cfg: MaskingConfig) -> TrainingMask:
  """Draws t, the prompt prefix and the masked positions for a batch.

  Args:
    rng: PRNG key.
    valid: `[batch, length]` bool, True at real tokens (a prefix per row).
    cfg: masking settings.
  """
  rng_t, rng_prompt, rng_mask = jax.random.split(rng, 3)
  batch, length = valid.shape
  lengths = valid.sum(-1).astype(jnp.int32)
  t = jnp.clip(jax.random.uniform(rng_t, (batch,)), 1e-5, 1.0)
  ratio = jnp.maximum(mask_ratio(t, cfg.schedule), cfg.min_mask_ratio)
  prompt_lengths = sample_prompt_lengths(rng_prompt, lengths, cfg)
  index = jnp.arange(length)[None, :]
  is_prompt = index < prompt_lengths[:, None]
  candidates = valid & ~is_prompt
  is_masked = candidates & jax.random.bernoulli(rng_mask, ratio[:, None], (batch, length))
  # A sample with nothing masked masks its first target token instead.
  first_target = (index == prompt_lengths[:, None]) & candidates
  is_masked = jnp.where(is_masked.any(-1, keepdims=True), is_masked, first_target)
  return TrainingMask(t=t, ratio=ratio, prompt_lengths=prompt_lengths, is_prompt=is_prompt,
                      is_masked=is_masked)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Cross-entropy and accuracy over weighted positions, normalized by their count.

  Args:
    logits: `[batch, length, vocab]` (any float dtype; computed in float32).
    targets: `[batch, length]` int ids.
    weights: `[batch, length]` bool/float, 1 at scored (masked, valid) tokens.

  Returns:
    (loss, accuracy, count): mean CE and accuracy over scored tokens, and the
    number of scored tokens (float32 scalars; loss and accuracy are 0 if none).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce = log_z - target_logit
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  count = weights.sum()
  denom = jnp.maximum(count, 1.0)
  return (ce * weights).sum() / denom, (correct * weights).sum() / denom, count
