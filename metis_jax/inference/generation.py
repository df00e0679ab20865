"""From SSL tokens to sound: S2A (layer 0, then layers 1..11) and the codec decoder.

`SpeechRenderer` takes SSL tokens of [prompt; target] and the prompt's
acoustic codes and returns the target's 24 kHz waveform.

The two token streams disagree by about one frame on a prompt clip: SSL
tokens come from 16 kHz fbank frames, ceil((floor((N - 400) / 160) + 1) / 2)
of them (149 for 3 s), acoustic codes from 24 kHz / 480 (150 for 3 s). The
original sets the target length to len(SSL [prompt; target]) - len(acoustic
prompt), which shifts every target frame by one against its SSL token and
drops the last one. Here both prompts are cut to the shorter of the two
(dropping the acoustic prompt's last 20 ms frame), so frame i of the acoustic
stream always sits on SSL token i and every target SSL token is rendered:
T target tokens give exactly T * 480 samples.
"""

import dataclasses
from typing import Optional, Protocol

import jax
import jax.numpy as jnp

from metis_jax.models import s2a
from metis_jax.inference import s2a_decoding


class CodecDecoder(Protocol):
  """What the renderer needs of an acoustic codec (e.g. AcousticCodecInference)."""
  hop: int

  def decode(self, codes, frame_lengths=None) -> jax.Array:
    """codes `[batch, frames, n_q]` -> wav `[batch, frames * hop]`."""


@dataclasses.dataclass
class S2AStage:
  """One S2A model with its parameters and decoding options."""
  model: s2a.S2AModel
  params: dict
  options: s2a_decoding.S2ADecodeOptions

  def decoder(self) -> s2a_decoding.S2ADecoder:
    return s2a_decoding.S2ADecoder(self.model, self.options)


def align_prompts(prompt_semantic_lengths: jax.Array, prompt_acoustic_lengths: jax.Array) -> jax.Array:
  """Per-sample prompt frames used by both streams: the shorter of the two (`[batch]`)."""
  return jnp.minimum(prompt_semantic_lengths, prompt_acoustic_lengths)


def join_prompt_and_target(prompt: jax.Array, prompt_lengths: jax.Array, target: jax.Array,
                           target_lengths: jax.Array) -> jax.Array:
  """Packs each row as [prompt_i; target_i; 0...].

  Args:
    prompt: `[batch, P, ...]`, target: `[batch, T, ...]`.
    prompt_lengths, target_lengths: `[batch]`.

  Returns:
    `[batch, P + T, ...]`.
  """
  p, t = prompt.shape[1], target.shape[1]
  index = jnp.arange(p + t)[None, :]
  from_prompt = index < prompt_lengths[:, None]
  target_index = jnp.clip(index - prompt_lengths[:, None], 0, t - 1)
  prompt_index = jnp.clip(index, 0, p - 1)
  extra = (1,) * (prompt.ndim - 2)
  gather = lambda x, i: jnp.take_along_axis(x, i.reshape(i.shape + extra), axis=1)
  joined = jnp.where(from_prompt.reshape(from_prompt.shape + extra), gather(prompt, prompt_index),
                     gather(target, target_index))
  valid = index < (prompt_lengths + target_lengths)[:, None]
  return jnp.where(valid.reshape(valid.shape + extra), joined, 0)


class SpeechRenderer:
  """SSL tokens + acoustic prompt -> waveform.

  Args:
    full: the S2A model that produces the codec layers (the released full
      model predicts layers 1..11 from layer 0).
    first_layer: the S2A model that predicts layer 0 (the released 1-layer
      model); None if `full` predicts layer 0 itself.
    codec: the acoustic codec decoder.
    prompt_context: decode the prompt's codes together with the target's and
      cut them off afterwards, so the codec sees the prompt as left context
      (no click at the start); False decodes the target alone, as the
      original does.
  """

  def __init__(self, full: S2AStage, codec: CodecDecoder, first_layer: Optional[S2AStage] = None,
               prompt_context: bool = True):
    needs_layer0 = not full.model.config.predicts_first_layer
    if needs_layer0 and first_layer is None:
      raise ValueError("the full S2A model does not predict layer 0: give the 1-layer model as `first_layer`")
    self.full, self.first_layer, self.codec = full, first_layer, codec
    self.prompt_context = prompt_context
    self._full_decoder = full.decoder()
    self._first_decoder = first_layer.decoder() if first_layer is not None else None

  @property
  def params(self) -> dict:
    """Every parameter the renderer uses: {"full", "first", "codec"} (None where absent), for
    `apply` (e.g. placed on a mesh once and passed to a jitted, sharded call)."""
    return {"full": self.full.params,
            "first": self.first_layer.params if self.first_layer is not None else None,
            "codec": getattr(self.codec, "params", None)}

  def codes(self, rng, prompt_semantic, prompt_acoustic, prompt_lengths, target_semantic,
            target_lengths, params: Optional[dict] = None) -> jax.Array:
    """Codec codes `[batch, T, num_quantizers]` for the target (prompts already aligned)."""
    params = self.params if params is None else params
    rng_first, rng_full = jax.random.split(rng) if rng.shape == () else (
        jax.vmap(lambda k: jax.random.fold_in(k, 0))(rng), jax.vmap(lambda k: jax.random.fold_in(k, 1))(rng))
    given = None
    if self._first_decoder is not None:
      given = self._first_decoder(params["first"], rng_first, prompt_semantic, prompt_acoustic,
                                  prompt_lengths, target_semantic, target_lengths)[..., :1]
    return self._full_decoder(params["full"], rng_full, prompt_semantic, prompt_acoustic,
                              prompt_lengths, target_semantic, target_lengths, given=given)

  def __call__(self, rng, prompt_semantic, prompt_semantic_lengths, prompt_acoustic,
               prompt_acoustic_lengths, target_semantic, target_lengths):
    """Renders a batch with the renderer's own parameters (see `apply`)."""
    return self.apply(self.params, rng, prompt_semantic, prompt_semantic_lengths, prompt_acoustic,
                      prompt_acoustic_lengths, target_semantic, target_lengths)

  def apply(self, params: dict, rng, prompt_semantic, prompt_semantic_lengths, prompt_acoustic,
            prompt_acoustic_lengths, target_semantic, target_lengths):
    """Renders a batch; a pure function of `params` (`self.params`-shaped), so it can be traced.

    Args:
      params: {"full", "first", "codec"} parameters.
      rng: one PRNG key or `[batch]` keys.
      prompt_semantic: `[batch, P]` SSL tokens of the prompt; lengths `[batch]`.
      prompt_acoustic: `[batch, Pa, 12]` codec codes of the prompt; lengths `[batch]`.
      target_semantic: `[batch, T]` SSL tokens to render; target_lengths `[batch]`.

    Returns:
      (wav `[batch, T * hop]` float32 with zeros past each length, lengths in
      samples `[batch]`, codes `[batch, T, 12]`).
    """
    prompt_lengths = align_prompts(jnp.asarray(prompt_semantic_lengths), jnp.asarray(prompt_acoustic_lengths))
    width = min(prompt_semantic.shape[1], prompt_acoustic.shape[1])
    prompt_semantic, prompt_acoustic = prompt_semantic[:, :width], prompt_acoustic[:, :width]
    target_lengths = jnp.asarray(target_lengths)
    codes = self.codes(rng, jnp.asarray(prompt_semantic), jnp.asarray(prompt_acoustic), prompt_lengths,
                       jnp.asarray(target_semantic), target_lengths, params=params)
    hop = self.codec.hop
    target_len = codes.shape[1]
    if self.prompt_context:
      n_q = codes.shape[-1]
      joined = join_prompt_and_target(jnp.asarray(prompt_acoustic)[..., :n_q].astype(jnp.int32),
                                      prompt_lengths, codes, target_lengths)
      audio = codec_call(self.codec, params["codec"], "decode", joined, prompt_lengths + target_lengths)
      start = (prompt_lengths * hop)[:, None] + jnp.arange(target_len * hop)[None, :]
      audio = jnp.take_along_axis(audio, jnp.clip(start, 0, audio.shape[1] - 1), axis=1)
    else:
      audio = codec_call(self.codec, params["codec"], "decode", codes, target_lengths)
    samples = target_lengths * hop
    audio = jnp.where(jnp.arange(target_len * hop)[None, :] < samples[:, None], audio, 0.0)
    return audio, samples, codes


def codec_call(codec, params, method: str, *args) -> jax.Array:
  """`codec.<method>(*args)` ("encode" / "decode") with explicit `params`.

  A codec holding a flax `model` and its `params` (AcousticCodecInference)
  is applied to the given parameters, so the call can be traced with them as
  an argument (not baked in as constants); any other codec is called as is.
  """
  model = getattr(codec, "model", None)
  if params is None or model is None:
    return getattr(codec, method)(*args)
  return model.apply({"params": params}, *(jnp.asarray(a) for a in args), method=getattr(type(model), method))
