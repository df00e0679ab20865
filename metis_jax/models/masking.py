"""The masked generative objective, shared by training and decoding.

A sample's valid tokens are split into a prompt prefix (always visible) and
the rest, of which a fraction gamma(t) is replaced by the mask embedding. The
loss is the cross-entropy on the masked, non-padding positions.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metis_jax.nn import packing

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


def argmax_hits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, -1) == targets`, `[..., vocab]`, `[...]` -> bool `[...]`.

  XLA:CPU runs argmax's (value, index) reduction scalar by scalar: 5 of the
  130 ms of the tiny train step at `[4, 500, 1024]`. The first index holding
  the maximum, a max and then a min over `where(logits == max, index, vocab)`,
  takes two plain reductions that vectorize (1.4 ms). Same ties (the first
  maximum wins); a row holding NaN is never a hit (argmax would pick its first
  NaN), which only affects the accuracy metric of a step whose loss is NaN.
  """
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  first = jnp.min(jnp.where(logits == top, index, vocab), axis=-1)
  return first == targets


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Cross-entropy and accuracy over weighted positions, normalized by their count.

  The reference for `chunked_cross_entropy`, which gives the same numbers
  from hidden states without the `[batch, length, vocab]` logits.

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
  # A one-hot product, not a gather: its gradient is elementwise, not a scatter-add.
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  ce = log_z - jnp.sum(logits * one_hot, axis=-1)
  correct = argmax_hits(logits, targets).astype(jnp.float32)
  count = weights.sum()
  denom = jnp.maximum(count, 1.0)
  return (ce * weights).sum() / denom, (correct * weights).sum() / denom, count


# project(head, hidden `[batch, chunk, embed]`) -> float32 logits `[batch, chunk, vocab]`.
Projection = Callable[[Any, jax.Array], jax.Array]
# CPU, head alone at B 2 x T 1024 x embed 512 x vocab 8192, ~55% scored: chunks of
# 128 take 0.66x the time and 0.29x the memory of full logits; 512: 1.27x, 0.79x.
DEFAULT_CHUNK = 128
MIN_CHUNKED_VOCAB = 4096


def chunked_cross_entropy(project: Projection, head: Any, hidden: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk_size: int = DEFAULT_CHUNK):
  """`masked_cross_entropy(project(head, hidden), targets, weights)` without its logits.

  Each row's scored positions are moved to the front (stable), and the
  logits are made `chunk_size` positions of every row at a time; chunks past
  the longest row's scored count are skipped. Rows no longer than
  `chunk_size`, and vocabularies under `MIN_CHUNKED_VOCAB`, take the plain
  `masked_cross_entropy` of the logits. Under differentiation each
  chunk computes its gradient at once (softmax - one-hot, through `project`'s
  VJP), so neither the `[batch, length, vocab]` logits nor their softmax are
  ever stored, and nothing is recomputed.

  Args:
    project: the logits head, a pure function of (`head`, hidden chunk).
    head: the head's parameters (a pytree of float arrays; gradients flow to it).
    hidden: `[batch, length, embed]` final hidden states.
    targets: `[batch, length]` int ids.
    weights: `[batch, length]` bool/float, 1 at scored tokens (no gradient).
    chunk_size: positions per row in one chunk.

  Returns:
    (loss, accuracy, count), as `masked_cross_entropy`.
  """
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  denom = jnp.maximum(count, 1.0)
  targets = targets.astype(jnp.int32)
  batch, length = targets.shape
  size = min(chunk_size, length)
  num = -(-length // size)
  pad = num * size - length
  vocab = jax.eval_shape(project, head, hidden[:, :1]).shape[-1]
  if num == 1 or vocab < MIN_CHUNKED_VOCAB:
    # Nothing to skip, or logits too small for the loop to pay: XLA fuses the plain
    # form best (CPU, B 4 x T 500, vocab 1024: the chunk loop cost ~9% of the step).
    return masked_cross_entropy(project(head, hidden), targets, weights)
  order = packing.left_pack(weights > 0)
  hidden = packing.pack(hidden, order)
  targets = jnp.take_along_axis(targets, order.order, axis=1)
  scored = jnp.take_along_axis(weights, order.order, axis=1)

  def chunks(x):  # [batch, length, ...] -> [num, batch, size, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((batch, num, size) + x.shape[2:]), 0, 1)

  needed = jnp.arange(num) * size < order.lengths.max()
  ce_sum, correct_sum = _chunked_sums(project, head, chunks(hidden), chunks(targets),
                                      chunks(scored), needed)
  return ce_sum / denom, correct_sum / denom, count


def _chunk_stats(logits, targets, weights):
  """Summed CE, summed correct and d(summed CE)/d(logits) of one chunk `[batch, size, vocab]`."""
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  ce = log_z[..., 0] - jnp.sum(logits * one_hot, axis=-1)
  correct = argmax_hits(logits, targets).astype(jnp.float32)
  d_logits = (jnp.exp(logits - log_z) - one_hot) * weights[..., None]
  return (ce * weights).sum(), (correct * weights).sum(), d_logits


def _zero_sums():
  return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_sums(project, head, hidden, targets, weights, needed):
  """(sum of CE, sum of correct) over chunks `[num, batch, size, ...]`."""
  def body(sums, chunk):
    h, t, w, need = chunk
    def run():
      ce, correct, _ = _chunk_stats(project(head, h).astype(jnp.float32), t, w)
      return ce, correct
    ce, correct = jax.lax.cond(need, run, _zero_sums)
    return (sums[0] + ce, sums[1] + correct), None
  sums, _ = jax.lax.scan(body, _zero_sums(), (hidden, targets, weights, needed))
  return sums


def _chunked_sums_fwd(project, head, hidden, targets, weights, needed):
  zero_head = jax.tree_util.tree_map(jnp.zeros_like, head)

  def body(carry, chunk):
    ce_sum, correct_sum, d_head = carry
    h, t, w, need = chunk
    def run():
      logits, vjp = jax.vjp(project, head, h)
      ce, correct, d_logits = _chunk_stats(logits.astype(jnp.float32), t, w)
      d_head_chunk, d_h = vjp(d_logits.astype(logits.dtype))
      return ce, correct, d_head_chunk, d_h
    def skip():
      return (*_zero_sums(), zero_head, jnp.zeros_like(h))
    ce, correct, d_head_chunk, d_h = jax.lax.cond(need, run, skip)
    d_head = jax.tree_util.tree_map(jnp.add, d_head, d_head_chunk)
    return (ce_sum + ce, correct_sum + correct, d_head), d_h

  (ce_sum, correct_sum, d_head), d_hidden = jax.lax.scan(
      body, (*_zero_sums(), zero_head), (hidden, targets, weights, needed))
  return (ce_sum, correct_sum), (d_head, d_hidden)


def _chunked_sums_bwd(project, residual, cotangents):
  del project
  d_head, d_hidden = residual
  g = cotangents[0]  # the correct count is piecewise constant: no gradient
  scale = lambda x: (x * g).astype(x.dtype)
  return (jax.tree_util.tree_map(scale, d_head), scale(d_hidden), None, None, None)


_chunked_sums.defvjp(_chunked_sums_fwd, _chunked_sums_bwd)
