"""MaskGIT-style iterative decoding: one jitted `lax.scan` over a static number of steps.

Every array keeps its static shape `[batch, length]`; per-sample target
lengths live in a `valid` mask. Each step samples every still-masked position,
then re-masks exactly n_i = floor(T_i * gamma(t_next)) of the least confident
among them (by a stable sort: exact counts, no ties), so decided tokens are
never revisited. `masked_decode` is model-agnostic: it takes a function that
maps the current tokens and mask to logits. `MetisDecoder` builds that
function for the stage-1 model, with classifier-free guidance (a second,
target-only forward) normalized per sample.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metis_jax.models import masking
from metis_jax.models import metis

# (tokens [B, T] int32, is_masked [B, T] bool, t scalar f32) -> logits [B, T, V] f32
LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Decoding settings (static: a change recompiles). See config_base.decode_config."""
  steps: int = 25
  cfg: float = 2.5
  rescale_cfg: float = 0.75
  temperature: float = 0.9
  top_k_ratio: float = 0.02
  confidence_noise: float = 1.0
  schedule: str = "sine"

  @classmethod
  def from_config(cls, decode: ml_collections.ConfigDict, schedule: str = "sine") -> "DecodeOptions":
    return cls(steps=decode.steps, cfg=decode.cfg, rescale_cfg=decode.rescale_cfg,
               temperature=decode.temperature, top_k_ratio=decode.top_k_ratio,
               confidence_noise=decode.confidence_noise, schedule=schedule)

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"decoding needs at least one step, got {self.steps}")

  def top_k(self, vocab_size: int) -> int:
    return max(1, min(vocab_size, math.ceil(self.top_k_ratio * vocab_size)))


def time_grid(steps: int) -> np.ndarray:
  """`[steps + 1]` float32: t_i = 1 - i / steps, ending at t_steps = 0."""
  return np.array([1.0 - i / steps for i in range(steps)] + [0.0], dtype=np.float32)


def guide(h_cond: jax.Array, h_uncond: jax.Array, valid: jax.Array, scale: float,
          rescale: float) -> jax.Array:
  """Classifier-free guidance on hidden states, std-rescaled per sample.

  g = h_c + w (h_c - h_u); g' = g * std(h_c) / std(g); out = r g' + (1 - r) g,
  the standard deviations taken over each sample's valid positions and all
  features (the reference pools the whole batch, coupling samples).

  Args:
    h_cond, h_uncond: `[batch, length, embed]`.
    valid: `[batch, length]` bool.
    scale: w. rescale: r.
  """
  h_cond = h_cond.astype(jnp.float32)
  g = h_cond + scale * (h_cond - h_uncond.astype(jnp.float32))
  if rescale == 0:
    return g
  w = valid.astype(jnp.float32)[..., None]
  n = jnp.maximum(w.sum((1, 2)) * h_cond.shape[-1], 2.0)

  def std(x):
    mean = (x * w).sum((1, 2)) / n
    var = (jnp.square(x - mean[:, None, None]) * w).sum((1, 2)) / (n - 1)
    return jnp.sqrt(var)

  ratio = std(h_cond) / jnp.maximum(std(g), 1e-12)
  return rescale * (g * ratio[:, None, None]) + (1 - rescale) * g


def remask_least_confident(confidence: jax.Array, is_masked: jax.Array,
                           counts: jax.Array) -> jax.Array:
  """Chooses exactly counts[i] positions among is_masked[i] with the lowest confidence.

  Args:
    confidence: `[batch, length]` float.
    is_masked: `[batch, length]` bool, the candidates.
    counts: `[batch]` int, at most the number of candidates.

  Returns:
    `[batch, length]` bool. Ties are broken by position (stable sort).
  """
  score = jnp.where(is_masked, confidence, jnp.inf)
  order = jnp.argsort(score, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return (rank < counts[:, None]) & is_masked


def sample_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One PRNG key per sample: `rng` itself if it is already `[batch]` keys,
  else `fold_in(rng, i)` for sample i."""
  if rng.shape == (batch,):
    return rng
  if rng.shape != ():
    raise ValueError(f"rng must be one key or {batch} keys, got shape {rng.shape}")
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))


def _position_gumbels(keys: jax.Array, step: jax.Array, length: int, size: int) -> jax.Array:
  """`[batch, length, size]` Gumbel noise; each (sample, step, position) has its own key,
  so a sample's noise does not depend on the batch it is decoded in."""
  def per_sample(key):
    key = jax.random.fold_in(key, step)
    return jax.vmap(lambda p: jax.random.gumbel(jax.random.fold_in(key, p), (size,)))(
        jnp.arange(length))
  return jax.vmap(per_sample)(keys)


def masked_decode(logits_fn: LogitsFn, rng: jax.Array, valid: jax.Array,
                  options: DecodeOptions, return_history: bool = False):
  """Decodes all valid positions from fully masked, in `options.steps` steps.

  Args:
    logits_fn: (tokens, is_masked, t) -> float32 logits `[batch, length, vocab]`.
    rng: one PRNG key, or `[batch]` keys (one per sample: then a sample's
      output is independent of its batch mates). The output is a
      deterministic function of the keys.
    valid: `[batch, length]` bool, the positions to generate (a prefix per row
      or any subset); the rest stay 0.
    options: static settings.
    return_history: also return, for each step, the mask and the tokens it
      started from: a dict of `[steps, batch, length]` arrays.

  Returns:
    `[batch, length]` int32 tokens (0 where not valid), and the history if asked.
  """
  batch, length = valid.shape
  lengths = valid.sum(-1).astype(jnp.float32)
  steps = options.steps
  times = time_grid(steps)
  # n_i(next) = floor(T_i * gamma(t_next)), gamma tabulated on the host in float32.
  next_ratio = masking.mask_ratio(times[1:], options.schedule).astype(np.float32)
  keys = sample_keys(rng, batch)

  def step(carry, i):
    tokens, is_masked = carry
    t = jnp.asarray(times)[i]
    logits = logits_fn(tokens, is_masked, t)
    k = options.top_k(logits.shape[-1])
    top_logits, top_ids = jax.lax.top_k(logits, k)  # [B, T, k]
    needs_noise = options.temperature != 0 or options.confidence_noise != 0
    noise = _position_gumbels(keys, i, length, k + 1) if needs_noise else None
    if options.temperature == 0:
      choice = jnp.argmax(top_logits, axis=-1)
    else:
      temperature = 0.2 if steps == 1 else jnp.maximum(options.temperature * t, 1e-3)
      noisy = top_logits / temperature + noise[..., :k]
      greedy = jnp.logical_and(i == steps - 1, steps > 1)
      choice = jnp.where(greedy, jnp.argmax(top_logits, -1), jnp.argmax(noisy, -1))
    sampled = jnp.take_along_axis(top_ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    probs = jax.nn.softmax(top_logits, axis=-1)
    confidence = jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
    if options.confidence_noise:
      confidence = confidence + options.confidence_noise * t * noise[..., k]
    new_tokens = jnp.where(is_masked, sampled, tokens)
    counts = jnp.floor(lengths * jnp.asarray(next_ratio)[i]).astype(jnp.int32)
    new_masked = remask_least_confident(confidence, is_masked, counts)
    return (new_tokens, new_masked), {"masks": is_masked, "tokens": tokens}

  init = (jnp.zeros((batch, length), jnp.int32), valid.astype(bool))
  (tokens, _), history = jax.lax.scan(step, init, jnp.arange(steps))
  tokens = jnp.where(valid, tokens, 0)
  return (tokens, history) if return_history else tokens


def lengths_to_valid(lengths: jax.Array, size: int) -> jax.Array:
  """`[batch]` lengths -> `[batch, size]` bool prefix masks."""
  return jnp.arange(size)[None, :] < lengths[:, None]


def split_features(features: jax.Array, prompt_lengths: jax.Array, prompt_len: int,
                   target_len: int) -> tuple[jax.Array, jax.Array]:
  """Contiguous per-sample frames -> the decoder's padded [prompt | target] slots.

  Args:
    features: `[batch, feature_len, dim]`; row i: prompt_lengths[i] prompt frames, then its
      target frames.
    prompt_lengths: `[batch]` int.
    prompt_len, target_len: static slot sizes.

  Returns:
    (`[batch, prompt_len, dim]`, `[batch, target_len, dim]`); frames past the
    input are zero (those slots are padding).
  """
  features = jnp.asarray(features)
  size = features.shape[1]
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  prompt_idx = jnp.broadcast_to(jnp.arange(prompt_len)[None, :], (features.shape[0], prompt_len))
  target_idx = prompt_lengths[:, None] + jnp.arange(target_len)[None, :]

  def gather(idx, keep):
    rows = jnp.take_along_axis(features, jnp.clip(idx, 0, max(size - 1, 0))[..., None], axis=1)
    return jnp.where((keep & (idx < size))[..., None], rows, 0).astype(features.dtype)

  return (gather(prompt_idx, prompt_idx < prompt_lengths[:, None]),
          gather(target_idx, jnp.ones_like(target_idx, bool)))


def without_adapter(params):
  """`params` with the adapter's output layer zeroed: its output is exactly 0."""
  adapter = dict(params["adapter"])
  adapter["out_linear"] = jax.tree.map(jnp.zeros_like, adapter["out_linear"])
  return {**params, "adapter": adapter}


class MetisDecoder:
  """Generates SSL tokens with the stage-1 model.

  Layout of one forward pass: `[phones | prompt | target]` slots, each padded
  to the batch maximum; RoPE positions count valid slots only, so a sample's
  output does not depend on its batch mates. With CFG the unconditional branch
  is a second forward over the target slots alone (`[batch, target_len]`: no
  prompt, no phones; the target's adapter output kept), as in the original.
  The phone prefix and the adapter output do not change from step to step:
  they are computed once, before the decoding loop.

  Usage:
    decoder = MetisDecoder(model, DecodeOptions(...))
    tokens = decoder(params, rng, prompt_tokens, prompt_lengths, target_lengths,
                     target_len=T)
  `__call__` is one `jax.jit`-compiled function; calls with equal shapes reuse it.
  """

  def __init__(self, model: metis.MetisModel, options: DecodeOptions):
    self.model = model
    self.options = options
    self._jitted = jax.jit(self._decode, static_argnames=("target_len",))

  def __call__(self, params, rng, prompt_tokens, prompt_lengths, target_lengths, *,
               target_len: int, phones=None, phone_lengths=None, prompt_features=None,
               target_features=None, features=None):
    """Decodes a batch.

    Args:
      params: model parameters.
      rng: one PRNG key, or `[batch]` keys (one per example, e.g.
        `fold_in(seed_key, example_id)`: then an example's tokens do not
        depend on which examples share its batch).
      prompt_tokens: `[batch, prompt_len]` int, left-aligned, padded.
      prompt_lengths: `[batch]` int (0 = no prompt).
      target_lengths: `[batch]` int, tokens to generate per sample (<= target_len).
      target_len: static size of the target slot.
      phones: `[batch, phone_len]` int, left-aligned (phone models).
      phone_lengths: `[batch]` int.
      prompt_features: `[batch, prompt_len, cond_dim]` (adapter models), slot-aligned.
      target_features: `[batch, target_len, cond_dim]` (adapter models), slot-aligned.
      features: `[batch, feature_len, cond_dim]` (adapter models; instead of the two
        above): row i holds its frames over [prompt; target] contiguously,
        prompt_lengths[i] + target_lengths[i] of them (zero-padded after). Frame
        j < prompt_lengths[i] conditions prompt token j, frame prompt_lengths[i] + k
        target token k. The adapter output is added at every position; the CFG
        pass (target alone) keeps the target's frames.
      An adapter model called without any features (Omni's TTS) runs with its
      adapter output set to zero.

    Returns:
      `[batch, target_len]` int32 tokens; positions past target_lengths[i] are 0.
    """
    if features is not None:
      if prompt_features is not None or target_features is not None:
        raise ValueError("give `features` or `prompt_features`/`target_features`, not both")
      prompt_features, target_features = split_features(
          features, prompt_lengths, prompt_tokens.shape[1], target_len)
    return self._jitted(params, rng, prompt_tokens, prompt_lengths, target_lengths,
                        target_len=target_len, phones=phones, phone_lengths=phone_lengths,
                        prompt_features=prompt_features, target_features=target_features)

  def _decode(self, params, rng, prompt_tokens, prompt_lengths, target_lengths, *, target_len,
              phones, phone_lengths, prompt_features, target_features):
    options, model = self.options, self.model
    batch, prompt_len = prompt_tokens.shape
    prompt_valid = lengths_to_valid(prompt_lengths, prompt_len)
    target_valid = lengths_to_valid(target_lengths, target_len)
    valid = jnp.concatenate([prompt_valid, target_valid], axis=1)
    apply = lambda method, *args, **kwargs: model.apply({"params": params}, *args, method=method,
                                                        **kwargs)
    cond, uncond = self._conditions(apply, batch, prompt_len, target_len, phones, phone_lengths,
                                    prompt_features, target_features)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    not_masked = jnp.zeros_like(prompt_valid)

    def logits_fn(tokens, is_masked, t):
      t = jnp.full((batch,), t, jnp.float32)
      seq = jnp.concatenate([prompt_tokens, tokens], axis=1)
      seq_masked = jnp.concatenate([not_masked, is_masked], axis=1)
      hidden = apply(metis.MetisModel.hidden_states, seq, seq_masked, valid, t, **cond)
      hidden = hidden[:, prompt_len:]
      if options.cfg != 0:
        # The unconditional pass: the target slots alone (`[batch, target_len]`).
        h_uncond = apply(metis.MetisModel.hidden_states, tokens, is_masked, target_valid, t, **uncond)
        hidden = guide(hidden, h_uncond, target_valid, options.cfg, options.rescale_cfg)
      return apply(metis.MetisModel.logits, hidden.astype(model.config.backbone.compute_dtype))

    return masked_decode(logits_fn, rng, target_valid, options)

  def _conditions(self, apply, batch, prompt_len, target_len, phones, phone_lengths,
                  prompt_features, target_features) -> tuple[dict, dict]:
    """The step-invariant inputs of both passes, computed once before the decoding loop.

    Returns:
      (conditional, unconditional) keyword arguments of `MetisModel.hidden_states`:
      the phone prefix `[batch, phones, embed]` with its mask (unconditional: an
      empty prefix), the adapter output over `[prompt | target]` (unconditional:
      its target slots).
    """
    config = self.model.config
    cond, uncond = {}, {}
    if phones is not None and not config.use_phone_cond:
      cond["phones"] = phones  # refused by the model (no phone condition)
    elif phones is not None:
      cond["phone_prefix"] = apply(metis.MetisModel.phone_prefix, phones)
      cond["phone_valid"] = lengths_to_valid(phone_lengths, phones.shape[1])
    if config.use_phone_cond:
      uncond["phone_prefix"] = jnp.zeros((batch, 0, config.hidden_size), config.backbone.compute_dtype)
      uncond["phone_valid"] = jnp.zeros((batch, 0), bool)
    if config.cond_feature_dim:
      if target_features is None:
        # No condition (Omni's TTS): the adapter adds exactly 0.
        added = jnp.zeros((batch, prompt_len + target_len, config.hidden_size),
                          config.backbone.compute_dtype)
      else:
        if prompt_features is None:
          prompt_features = jnp.zeros((batch, prompt_len, target_features.shape[-1]),
                                      target_features.dtype)
        added = apply(metis.MetisModel.adapter_output,
                      jnp.concatenate([prompt_features, target_features], axis=1))
      cond["adapter_out"], uncond["adapter_out"] = added, added[:, prompt_len:]
    elif target_features is not None:
      cond["features"] = target_features  # refused by the model (no adapter)
    return cond, uncond
