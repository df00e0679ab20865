"""Batched generation over many examples of different lengths.

`SpeechEngine` holds the loaded models and runs each stage on lists of
items, grouped by `length_buckets` into a few static shapes:

  encode_audio   waveforms -> SSL tokens (16 kHz tokenizer) and codec codes (24 kHz)
  semantic       stage 1: [phones | prompt tokens | masked target] -> SSL tokens
  render         S2A (+ the 1-layer model for layer 0) + codec decoder -> waveform
                 (`generation.SpeechRenderer`)
  masked_nll     reference SSL tokens -> NLL under the stage-1 model

Randomness comes from one key per item (derived from the example, not from
its batch), so an example's output does not depend on which examples share
its batch or on their order.
"""

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax import decoding, evaluation, generation, length_buckets, s2a_decoding
from metis_jax.model_loading import LoadedModel

SSL_RATE, CODEC_RATE = 16000, 24000


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """Static settings of a run (a change recompiles)."""
  stage1: decoding.DecodeOptions = decoding.DecodeOptions()
  s2a_full: s2a_decoding.S2ADecodeOptions = s2a_decoding.S2ADecodeOptions()
  s2a_first: s2a_decoding.S2ADecodeOptions = s2a_decoding.S2ADecodeOptions(steps=(40,), cfg=0.0)
  batch_size: int = 8
  # Padding multiples: tokens (50 = 1 s), phones, audio seconds.
  token_quantum: int = 50
  phone_quantum: int = 32
  audio_quantum_seconds: float = 2.0
  # Decode the prompt's codes with the target's (the codec sees the prompt as context).
  prompt_context: bool = True


@dataclasses.dataclass
class Stage1Item:
  prompt: np.ndarray            # [P] SSL tokens
  target_len: int
  key: jax.Array
  phones: Optional[np.ndarray] = None  # [N] ids (phone models; may be empty)


@dataclasses.dataclass
class RenderItem:
  prompt_semantic: np.ndarray   # [P]
  prompt_acoustic: np.ndarray   # [P, Q] (frame-aligned with prompt_semantic)
  target_semantic: np.ndarray   # [T]
  key: jax.Array


@dataclasses.dataclass
class NLLItem:
  prompt: np.ndarray
  target: np.ndarray
  key: jax.Array
  phones: Optional[np.ndarray] = None


# Called after each batch: (stage name, item indices done in this batch, wall seconds).
ProgressFn = Callable[[str, Sequence[int], float], None]


def _stack_keys(keys: Sequence[jax.Array], batch_size: int) -> jax.Array:
  keys = list(keys) + [keys[-1]] * (batch_size - len(keys))
  return jnp.stack(keys)


class SpeechEngine:
  """The models of a run and batched calls into them.

  Args:
    tokenizer: an `SSLTokenizer` (16 kHz in, 50 Hz tokens out).
    codec: an `AcousticCodecInference`-like object (`hop`, `encode`, `decode`).
    s2a_full: the S2A model that renders the codec layers.
    s2a_first: the 1-layer S2A model for layer 0 (when `s2a_full` does not
      predict it).
    stage1: the T2S / Metis model (None for stage-2-only tasks).
    options: `EngineOptions`.
  """

  def __init__(self, tokenizer, codec, s2a_full: LoadedModel, s2a_first: Optional[LoadedModel],
               stage1: Optional[LoadedModel], options: EngineOptions):
    self.tokenizer, self.codec, self.stage1, self.options = tokenizer, codec, stage1, options
    self.hop = int(codec.hop)
    self.num_quantizers = s2a_full.config.num_quantizers
    self._check_vocabularies(s2a_full, s2a_first)
    full_stage = generation.S2AStage(s2a_full.module, s2a_full.params,
                                     _fit_steps(options.s2a_full, s2a_full.config.num_quantizers))
    first_stage = None
    if s2a_first is not None and not s2a_full.config.predicts_first_layer:
      first_stage = generation.S2AStage(s2a_first.module, s2a_first.params,
                                        _fit_steps(options.s2a_first, s2a_first.config.num_quantizers))
    self.renderer = generation.SpeechRenderer(full_stage, codec, first_layer=first_stage,
                                              prompt_context=options.prompt_context)
    self._decoder = None
    self._nll = None
    if stage1 is not None:
      self._decoder = decoding.MetisDecoder(stage1.module, options.stage1)
    self._tokenize = getattr(tokenizer, "tokenize")

  def _check_vocabularies(self, s2a_full, s2a_first):
    vocab = int(self.tokenizer.vocab_size)
    models = [("S2A", s2a_full)] + ([("1-layer S2A", s2a_first)] if s2a_first else [])
    for name, m in models:
      if m.config.cond_vocab_size != vocab:
        raise ValueError(f"{m.source}: {name} is conditioned on {m.config.cond_vocab_size} SSL codes "
                         f"but the tokenizer has {vocab}")
    if self.stage1 is not None and self.stage1.config.vocab_size != vocab:
      raise ValueError(f"{self.stage1.source}: the stage-1 model has {self.stage1.config.vocab_size} "
                       f"SSL codes but the tokenizer has {vocab}")

  @property
  def uses_phones(self) -> bool:
    return self.stage1 is not None and bool(self.stage1.config.use_phone_cond)

  # ---------------------------------------------------------------- audio -> tokens

  def encode_audio(self, wavs16: Sequence[np.ndarray], wavs24: Sequence[Optional[np.ndarray]],
                   progress: Optional[ProgressFn] = None):
    """SSL tokens `[T]` of each 16 kHz waveform and codec codes `[F, Q]` of each 24 kHz one (None
    where no 24 kHz waveform is given). Returns (list of tokens, list of codes)."""
    o = self.options
    tokens: list = [None] * len(wavs16)
    codes: list = [None] * len(wavs16)
    q16 = int(o.audio_quantum_seconds * SSL_RATE)
    for batch in length_buckets.make_batches([(len(w),) for w in wavs16], o.batch_size, (q16,)):
      t0 = time.perf_counter()
      rows = [wavs16[i] for i in batch.indices]
      wav = length_buckets.stack_padded(rows, batch.shape[0], o.batch_size, np.float32)
      lengths = length_buckets.pad_lengths([len(r) for r in rows], o.batch_size)
      toks, tok_lengths = self._tokenize(wav, lengths)
      toks, tok_lengths = np.asarray(toks), np.asarray(tok_lengths)
      for k, i in enumerate(batch.indices):
        tokens[i] = toks[k, :tok_lengths[k]].astype(np.int32)
      if progress:
        progress("tokenize", batch.indices, time.perf_counter() - t0)
    with24 = [i for i, w in enumerate(wavs24) if w is not None]
    q24 = length_buckets.round_up(int(o.audio_quantum_seconds * CODEC_RATE), self.hop)
    for batch in length_buckets.make_batches([(len(wavs24[i]),) for i in with24], o.batch_size, (q24,)):
      t0 = time.perf_counter()
      rows = [wavs24[with24[j]] for j in batch.indices]
      wav = length_buckets.stack_padded(rows, batch.shape[0], o.batch_size, np.float32)
      lengths = length_buckets.pad_lengths([len(r) for r in rows], o.batch_size)
      out = np.asarray(self.codec.encode(wav, lengths))
      for k, j in enumerate(batch.indices):
        codes[with24[j]] = out[k, :len(rows[k]) // self.hop].astype(np.int32)
      if progress:
        progress("codec", [with24[j] for j in batch.indices], time.perf_counter() - t0)
    return tokens, codes

  # ---------------------------------------------------------------- stage 1

  def semantic(self, items: Sequence[Stage1Item], progress: Optional[ProgressFn] = None) -> list:
    """Generated SSL tokens `[target_len]` per item."""
    if self._decoder is None:
      raise ValueError("no stage-1 model loaded (--model)")
    o = self.options
    phones = self.uses_phones
    out: list = [None] * len(items)
    dims = [(len(it.prompt), it.target_len, len(it.phones) if phones else 0) for it in items]
    quanta = (o.token_quantum, o.token_quantum, o.phone_quantum)
    for batch in length_buckets.make_batches(dims, o.batch_size, quanta):
      t0 = time.perf_counter()
      rows = [items[i] for i in batch.indices]
      p, t, n = batch.shape
      prompt = length_buckets.stack_padded([r.prompt for r in rows], p, o.batch_size, np.int32)
      prompt_lengths = length_buckets.pad_lengths([len(r.prompt) for r in rows], o.batch_size)
      target_lengths = length_buckets.pad_lengths([r.target_len for r in rows], o.batch_size)
      kwargs = {}
      if phones:
        kwargs["phones"] = jnp.asarray(length_buckets.stack_padded(
            [r.phones for r in rows], n, o.batch_size, np.int32))
        kwargs["phone_lengths"] = jnp.asarray(
            length_buckets.pad_lengths([len(r.phones) for r in rows], o.batch_size))
      tokens = self._decoder(self.stage1.params, _stack_keys([r.key for r in rows], o.batch_size),
                             jnp.asarray(prompt), jnp.asarray(prompt_lengths),
                             jnp.asarray(target_lengths), target_len=t, **kwargs)
      tokens = np.asarray(tokens)
      for k, i in enumerate(batch.indices):
        out[i] = tokens[k, :items[i].target_len].astype(np.int32)
      if progress:
        progress("stage1", batch.indices, time.perf_counter() - t0)
    return out

  # ---------------------------------------------------------------- stage 2

  def render(self, items: Sequence[RenderItem], progress: Optional[ProgressFn] = None) -> list:
    """(waveform `[T * hop]` float32 at 24 kHz, codes `[T, Q]`) per item."""
    o = self.options
    out: list = [None] * len(items)
    dims = [(len(it.prompt_semantic), len(it.target_semantic)) for it in items]
    for batch in length_buckets.make_batches(dims, o.batch_size, (o.token_quantum, o.token_quantum)):
      t0 = time.perf_counter()
      rows = [items[i] for i in batch.indices]
      p, t = batch.shape
      q = rows[0].prompt_acoustic.shape[-1] if rows[0].prompt_acoustic.ndim == 2 else self.num_quantizers
      sem = length_buckets.stack_padded([r.prompt_semantic for r in rows], p, o.batch_size, np.int32)
      ac = length_buckets.stack_padded(
          [r.prompt_acoustic.reshape(-1, q) for r in rows], p, o.batch_size, np.int32)
      p_len = length_buckets.pad_lengths([len(r.prompt_semantic) for r in rows], o.batch_size)
      target = length_buckets.stack_padded([r.target_semantic for r in rows], t, o.batch_size, np.int32)
      t_len = length_buckets.pad_lengths([len(r.target_semantic) for r in rows], o.batch_size)
      wav, samples, codes = self.renderer(
          _stack_keys([r.key for r in rows], o.batch_size), jnp.asarray(sem), jnp.asarray(p_len),
          jnp.asarray(ac), jnp.asarray(p_len), jnp.asarray(target), jnp.asarray(t_len))
      wav, samples, codes = np.asarray(wav), np.asarray(samples), np.asarray(codes)
      for k, i in enumerate(batch.indices):
        n = len(items[i].target_semantic)
        out[i] = (wav[k, :samples[k]].astype(np.float32), codes[k, :n].astype(np.int32))
      if progress:
        progress("render", batch.indices, time.perf_counter() - t0)
    return out

  # ---------------------------------------------------------------- evaluation

  def masked_nll(self, items: Sequence[NLLItem]) -> list:
    """Mean NLL (nats/token) of each item's target SSL tokens under the stage-1 model."""
    if self.stage1 is None:
      raise ValueError("no stage-1 model loaded (--model)")
    if self._nll is None:
      self._nll = evaluation.make_masked_nll(self.stage1.module)
    o = self.options
    phones = self.uses_phones
    out: list = [None] * len(items)
    dims = [(len(it.prompt), len(it.target), len(it.phones) if phones else 0) for it in items]
    quanta = (o.token_quantum, o.token_quantum, o.phone_quantum)
    for batch in length_buckets.make_batches(dims, o.batch_size, quanta):
      rows = [items[i] for i in batch.indices]
      p, t, n = batch.shape
      args = [jnp.asarray(length_buckets.stack_padded([r.prompt for r in rows], p, o.batch_size, np.int32)),
              jnp.asarray(length_buckets.pad_lengths([len(r.prompt) for r in rows], o.batch_size)),
              jnp.asarray(length_buckets.stack_padded([r.target for r in rows], t, o.batch_size, np.int32)),
              jnp.asarray(length_buckets.pad_lengths([len(r.target) for r in rows], o.batch_size))]
      if phones:
        args += [jnp.asarray(length_buckets.stack_padded([r.phones for r in rows], n, o.batch_size, np.int32)),
                 jnp.asarray(length_buckets.pad_lengths([len(r.phones) for r in rows], o.batch_size))]
      else:
        args += [None, None]
      nll = np.asarray(self._nll(self.stage1.params, _stack_keys([r.key for r in rows], o.batch_size),
                                 *args))
      for k, i in enumerate(batch.indices):
        out[i] = float(nll[k])
    return out


def _fit_steps(options: s2a_decoding.S2ADecodeOptions, num_quantizers: int):
  """Step counts cut or padded (with 1s) to the model's number of codec layers."""
  steps = tuple(options.steps)[:num_quantizers]
  steps = steps + (1,) * (num_quantizers - len(steps))
  return dataclasses.replace(options, steps=steps)

