"""Layer-wise S2A decoding: codec layers one after another, each by masked decoding.

Layer l runs `decoding.masked_decode` for its own static number of steps; its
input is the sum of the decoded lower layers, the current layer (mask or
token) and the mask embedding once per higher layer, after an acoustic prompt
whose every layer is embedded. With CFG the unconditional branch is a second
forward over the target frames alone (no prompt; the SSL condition kept). A
layer's SSL condition is computed once, before its decoding loop.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from metis_jax.inference import decoding
from metis_jax.models import s2a


@dataclasses.dataclass(frozen=True)
class S2ADecodeOptions:
  """Static S2A decoding settings (see config_base.decode_config, `s2a_*`)."""
  steps: tuple = (40, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
  cfg: float = 2.5
  rescale_cfg: float = 0.75
  temperature: float = 1.5
  top_k_ratio: float = 0.02
  confidence_noise: float = 1.0
  schedule: str = "sine"

  @classmethod
  def from_config(cls, decode: ml_collections.ConfigDict, num_quantizers: int,
                  schedule: str = "sine") -> "S2ADecodeOptions":
    steps = tuple(decode.s2a_steps)[:num_quantizers]
    return cls(steps=steps, cfg=decode.s2a_cfg, rescale_cfg=decode.s2a_rescale_cfg,
               temperature=decode.s2a_temperature, top_k_ratio=decode.top_k_ratio,
               confidence_noise=decode.confidence_noise, schedule=schedule)

  def for_layer(self, layer: int) -> decoding.DecodeOptions:
    return decoding.DecodeOptions(steps=self.steps[layer], cfg=self.cfg,
                                  rescale_cfg=self.rescale_cfg, temperature=self.temperature,
                                  top_k_ratio=self.top_k_ratio,
                                  confidence_noise=self.confidence_noise, schedule=self.schedule)


class S2ADecoder:
  """Generates codec tokens `[batch, target_len, num_quantizers]` from SSL tokens.

  Usage:
    decoder = S2ADecoder(model, S2ADecodeOptions(steps=(40, 16) + (1,) * 10))
    codes = decoder(params, rng, prompt_semantic, prompt_acoustic, prompt_lengths,
                    target_semantic, target_lengths, given=layer0)
  One `jax.jit`-compiled function per input shape.
  """

  def __init__(self, model: s2a.S2AModel, options: S2ADecodeOptions):
    if len(options.steps) != model.config.num_quantizers:
      raise ValueError(f"{len(options.steps)} step counts for {model.config.num_quantizers} codec layers")
    self.model = model
    self.options = options
    self._jitted = jax.jit(self._decode)

  def __call__(self, params, rng, prompt_semantic, prompt_acoustic, prompt_lengths,
               target_semantic, target_lengths, given: Optional[jax.Array] = None):
    """Decodes a batch.

    Args:
      params: S2A parameters.
      rng: one PRNG key or `[batch]` keys (one per example).
      prompt_semantic: `[batch, prompt_len]` SSL tokens of the prompt.
      prompt_acoustic: `[batch, prompt_len, >= num_quantizers]` codec tokens of
        the prompt (frame-aligned with prompt_semantic; extra layers ignored).
      prompt_lengths: `[batch]` valid prompt frames (0 = no prompt).
      target_semantic: `[batch, target_len]` SSL tokens to render.
      target_lengths: `[batch]` valid target frames.
      given: optional `[batch, target_len, G]` codes of the first G layers
        (e.g. layer 0 from the 1-layer model); they are kept unchanged.

    Returns:
      `[batch, target_len, num_quantizers]` int32 codes, 0 past each target length.
    """
    return self._jitted(params, rng, prompt_semantic, prompt_acoustic, prompt_lengths,
                        target_semantic, target_lengths, given)

  def _decode(self, params, rng, prompt_semantic, prompt_acoustic, prompt_lengths,
              target_semantic, target_lengths, given):
    model, options = self.model, self.options
    cfg = model.config
    num_q = cfg.num_quantizers
    batch, prompt_len = prompt_semantic.shape
    target_len = target_semantic.shape[1]
    prompt_valid = decoding.lengths_to_valid(prompt_lengths, prompt_len)
    target_valid = decoding.lengths_to_valid(target_lengths, target_len)
    use_cfg = options.cfg != 0
    apply = lambda method, *args, **kwargs: model.apply({"params": params}, *args, method=method,
                                                        **kwargs)

    def embed(tokens, layer):
      return apply(s2a.S2AModel.embed_layer, tokens, layer)

    prompt_x = sum(embed(prompt_acoustic[..., q].astype(jnp.int32), q) for q in range(num_q))
    prompt_x = jnp.where(prompt_valid[..., None], prompt_x, 0)
    mask_vec = apply(s2a.S2AModel.mask_vector)
    cond_tokens = jnp.concatenate([prompt_semantic, target_semantic], 1).astype(jnp.int32)
    valid = jnp.concatenate([prompt_valid, target_valid], axis=1)

    codes = jnp.zeros((batch, target_len, num_q), jnp.int32)
    cumulative = jnp.zeros((batch, target_len, cfg.hidden_size), prompt_x.dtype)
    first = 0
    if given is not None:
      first = given.shape[-1]
      for q in range(first):
        layer_codes = jnp.where(target_valid, given[..., q].astype(jnp.int32), 0)
        codes = codes.at[..., q].set(layer_codes)
        cumulative = cumulative + embed(layer_codes, q)

    base_keys = decoding.sample_keys(rng, batch)

    def decode_layer(carry, layer, layer_options):
      """Decodes codec layer `layer` (a traced index) given the lower ones."""
      codes, cumulative = carry
      higher = mask_vec * (num_q - 1 - layer).astype(mask_vec.dtype)

      # The SSL condition of this layer, the same at every step: computed once.
      condition = apply(s2a.S2AModel.condition, cond_tokens, layer)

      def logits_fn(tokens, is_masked, t):
        t = jnp.full((batch,), t, jnp.float32)
        current = jnp.where(is_masked[..., None], mask_vec, embed(tokens, layer))
        target_x = cumulative + current + higher
        x = jnp.concatenate([prompt_x, target_x], axis=1)
        hidden = apply(s2a.S2AModel.hidden_states, x, None, layer, valid, t,
                       condition=condition)[:, prompt_len:]
        if use_cfg:
          # The unconditional pass: the target frames alone (no prompt; SSL condition kept).
          h_uncond = apply(s2a.S2AModel.hidden_states, target_x, None, layer, target_valid, t,
                           condition=condition[:, prompt_len:])
          hidden = decoding.guide(hidden, h_uncond, target_valid, options.cfg, options.rescale_cfg)
        return apply(s2a.S2AModel.logits, hidden, layer)

      keys = jax.vmap(lambda k: jax.random.fold_in(k, layer))(base_keys)
      layer_codes = decoding.masked_decode(logits_fn, keys, target_valid, layer_options)
      codes = jax.lax.dynamic_update_slice_in_dim(codes, layer_codes[..., None], layer, axis=2)
      return (codes, cumulative + embed(layer_codes, layer)), None

    # Consecutive layers with the same step count share one compiled body
    # (a scan over the layer index): the released schedule [40, 16, 1 x 10]
    # compiles three decoding loops, not twelve.
    carry = (codes, cumulative)
    for start, stop in _runs_of_equal_steps(options.steps, first):
      layer_options = options.for_layer(start)
      carry, _ = jax.lax.scan(lambda c, l: decode_layer(c, l, layer_options), carry,
                              jnp.arange(start, stop, dtype=jnp.int32))
    codes, _ = carry
    return codes



def _runs_of_equal_steps(steps, first: int):
  """[(start, stop)] covering layers first..len(steps)-1, grouped by equal step counts."""
  runs = []
  for layer in range(first, len(steps)):
    if runs and steps[runs[-1][0]] == steps[layer]:
      runs[-1][1] = layer + 1
    else:
      runs.append([layer, layer + 1])
  return [tuple(r) for r in runs]
