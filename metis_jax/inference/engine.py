"""Batched generation over many examples of different lengths, on a device mesh.

`SpeechEngine` holds the loaded models and runs each stage on lists of
items, grouped by `length_buckets` into a few static shapes:

  encode_audio   waveforms -> SSL tokens (16 kHz tokenizer) and codec codes (24 kHz)
  semantic       stage 1: [phones | prompt tokens | masked target] -> SSL tokens
  render         S2A (+ the 1-layer model for layer 0) + codec decoder -> waveform
                 (`generation.SpeechRenderer`)
  masked_nll     reference SSL tokens -> NLL under the stage-1 model

Each batch is laid out over the devices of a `batch_layout.BatchLayout`
(rows over data x fsdp, parameters replicated or sharded by the logical
rules; jitted with explicit shardings); `batch_size` is the global batch,
rounded up to a multiple of the batch shards. With several processes each
process passes its own items and gets their outputs back; every stage call
is collective (all processes call it, even with no items of their own) and
the processes agree on the batches' shapes first.

Stage 1 and rendering keep two batches in flight: batch n + 1 is padded and
dispatched before batch n's outputs are read back (`_in_flight`).

Randomness comes from one key per item (derived from the example, not from
its batch), so an example's output does not depend on which examples share
its batch, on their order, or on how many devices or processes run it.
"""

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from metis_jax.frontend import condition_features as condition_features_lib
from metis_jax.parallel import batch_layout
from metis_jax.inference import decoding, evaluation, generation, length_buckets, s2a_decoding
from metis_jax.inference.model_loading import LoadedModel

SSL_RATE, CODEC_RATE = 16000, 24000


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """Static settings of a run (a change recompiles)."""
  stage1: decoding.DecodeOptions = decoding.DecodeOptions()
  s2a_full: s2a_decoding.S2ADecodeOptions = s2a_decoding.S2ADecodeOptions()
  s2a_first: s2a_decoding.S2ADecodeOptions = s2a_decoding.S2ADecodeOptions(steps=(40,), cfg=0.0)
  batch_size: int = 8  # global: rounded up to a multiple of the layout's batch shards
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
  # [P + target_len, cond_dim] frame-level condition over [prompt; target] (adapter models).
  features: Optional[np.ndarray] = None


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
  features: Optional[np.ndarray] = None  # [P + T, cond_dim] (adapter models)


# Called after each batch: (stage name, this process's item indices in the batch, wall seconds,
# items in the whole batch over all processes).
ProgressFn = Callable[[str, Sequence[int], float, int], None]


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One global batch as this process sees it: its own items and the padded shape."""
  indices: tuple      # this process's items (may be empty: then padding rows only)
  shape: tuple        # padded size per dimension (the same on every process)
  total: int          # items in the batch over all processes


class SpeechEngine:
  """The models of a run and batched calls into them.

  Args:
    tokenizer: an `SSLTokenizer` (16 kHz in, 50 Hz tokens out); one with
      `with_layout` (the w2v-BERT tokenizer) runs sharded on the layout, any
      other on this process's rows as they are.
    codec: an `AcousticCodecInference`-like object (`hop`, `encode`, `decode`).
    s2a_full: the S2A model that renders the codec layers.
    s2a_first: the 1-layer S2A model for layer 0 (when `s2a_full` does not
      predict it).
    stage1: the T2S / Metis model (None for stage-2-only tasks).
    options: `EngineOptions`.
    layout: the mesh batches run on (default: all devices, data parallel).
  """

  def __init__(self, tokenizer, codec, s2a_full: LoadedModel, s2a_first: Optional[LoadedModel],
               stage1: Optional[LoadedModel], options: EngineOptions,
               layout: Optional[batch_layout.BatchLayout] = None):
    self.tokenizer, self.codec, self.stage1 = tokenizer, codec, stage1
    self.hop = int(codec.hop)
    self.num_quantizers = s2a_full.config.num_quantizers
    codec_config = getattr(codec, "config", None)
    self.codec_quantizers = int(getattr(codec_config, "num_quantizers", self.num_quantizers))
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
    if stage1 is not None:
      self._decoder = decoding.MetisDecoder(stage1.module, options.stage1)
    self.set_layout(layout if layout is not None else batch_layout.BatchLayout(batch_layout.make_mesh()),
                    options)

  def set_layout(self, layout: batch_layout.BatchLayout, options: EngineOptions) -> None:
    """(Re)places the parameters on `layout` and sizes batches by `options.batch_size`."""
    self.layout, self.options = layout, options
    self.rows = layout.round_rows(options.batch_size)  # global rows per batch
    self.local_rows = layout.local_rows(self.rows)     # this process's share
    self._fns: dict = {}
    self._nll = None
    self._stage1_shardings = self._stage1_params = None
    if self.stage1 is not None:
      self._stage1_shardings = layout.param_shardings(self.stage1.module, self.stage1.params)
      self._stage1_params = layout.put_params(self.stage1.params, self._stage1_shardings)
    renderer = getattr(self, "renderer", None)
    if renderer is not None:
      params = renderer.params
      self._render_shardings = {
          "full": layout.param_shardings(renderer.full.model, params["full"]),
          "first": (layout.param_shardings(renderer.first_layer.model, params["first"])
                    if renderer.first_layer is not None else None),
          "codec": jax.tree.map(lambda _: layout.replicated, params["codec"])}
      self._render_params = layout.put_params(params, self._render_shardings)
    # A tokenizer that shards itself moves onto the layout (its old placement is dropped).
    tokenizer = getattr(self, "tokenizer", None)
    if hasattr(tokenizer, "with_layout") and tokenizer.layout.mesh != layout.mesh:
      self.tokenizer = tokenizer = tokenizer.with_layout(layout)
    self._sharded_tokenizer = tokenizer if hasattr(tokenizer, "with_layout") else None

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

  # ---------------------------------------------------------------- batches over the layout

  def _plan(self, dims: Sequence[Sequence[int]], quanta: Sequence[int]) -> list[PlannedBatch]:
    """This process's items cut into batches of its rows, matched with every other process's:
    the same number of batches, in the same order, with the same shapes everywhere."""
    local = length_buckets.make_batches(dims, self.local_rows, quanta) if len(dims) else []
    every = self.layout.agree([b.shape + (len(b.indices),) for b in local], len(quanta) + 1)
    merged = length_buckets.merge_plans(every)
    return [PlannedBatch(local[k].indices if k < len(local) else (), shape, total)
            for k, (shape, total) in enumerate(merged)]

  def _stack(self, rows: Sequence[np.ndarray], size: int, dtype, tail: tuple = ()) -> np.ndarray:
    """`[local_rows, size, *tail]`: rows zero-padded; missing rows copy the last (zeros if none)."""
    if not rows:
      return np.zeros((self.local_rows, size) + tail, dtype)
    return length_buckets.stack_padded(rows, size, self.local_rows, dtype)

  def _lengths(self, lengths: Sequence[int], full: int) -> np.ndarray:
    """`[local_rows]` int32; a batch with no rows of this process gets full-length padding rows."""
    return length_buckets.pad_lengths(list(lengths) or [full], self.local_rows)

  def _keys(self, keys: Sequence[jax.Array]) -> np.ndarray:
    """`[local_rows, *key_shape]` uint32 raw key data (padding rows repeat the last key)."""
    if not keys:
      return np.zeros((self.local_rows,) + jax.random.key_data(jax.random.key(0)).shape, np.uint32)
    data = [np.asarray(jax.random.key_data(k)) for k in keys]
    return np.stack(data + [data[-1]] * (self.local_rows - len(data)))

  def _call(self, fn, params, *local_arrays):
    """fn on the global batch made of every process's rows -> this process's output rows."""
    return self._fetch(self._dispatch(fn, params, *local_arrays))

  def _dispatch(self, fn, params, *local_arrays):
    """Starts fn on the global batch of every process's rows; returns its device outputs
    without waiting for them (JAX dispatches asynchronously)."""
    return fn(params, *(self.layout.put(a) for a in local_arrays))

  def _fetch(self, out):
    """Device outputs of `_dispatch` -> this process's output rows (numpy; waits for them)."""
    return jax.tree.map(self.layout.get, out)

  def _in_flight(self, batches: Sequence[PlannedBatch], dispatch: Callable, collect: Callable) -> None:
    """Runs `dispatch(batch)` -> device outputs for each batch, two batches in flight: batch
    n + 1 is prepared and dispatched before batch n's outputs are fetched, so the host's
    padding, transfers and read-back overlap the device's work.

    `collect(batch, host_outputs, seconds)` gets each batch's outputs in order; `seconds` is
    the wall time since the previous batch was collected (the first: since the start), so
    the batches' seconds add up to the whole run.
    """
    pending = None
    last = time.perf_counter()
    for batch in batches:
      out = self._dispatch(*dispatch(batch))
      if pending is not None:
        last = self._collect(pending, collect, last)
      pending = (batch, out)
    if pending is not None:
      self._collect(pending, collect, last)

  def _collect(self, pending, collect: Callable, last: float) -> float:
    batch, out = pending
    host = self._fetch(out)
    now = time.perf_counter()
    collect(batch, host, now - last)
    return now

  def _jitted(self, name: str, fn: Callable, shardings, num_batch_args: int):
    if name not in self._fns:
      self._fns[name] = self.layout.jit(fn, shardings, num_batch_args)
    return self._fns[name]

  # ---------------------------------------------------------------- audio -> tokens

  def _tokenize(self, wav: np.ndarray, lengths: np.ndarray):
    """This process's rows -> (tokens `[rows, T]`, lengths `[rows]`) numpy."""
    if self._sharded_tokenizer is not None:
      return self._sharded_tokenizer.tokenize(wav, lengths)
    # A tokenizer that cannot shard runs on this process's rows alone.
    tokens, token_lengths = self.tokenizer.tokenize(wav, lengths)
    return np.asarray(tokens), np.asarray(token_lengths)

  def encode_audio(self, wavs16: Sequence[np.ndarray], wavs24: Sequence[Optional[np.ndarray]],
                   progress: Optional[ProgressFn] = None):
    """SSL tokens `[T]` of each 16 kHz waveform and codec codes `[F, Q]` of each 24 kHz one (None
    where no 24 kHz waveform is given). Returns (list of tokens, list of codes)."""
    o = self.options
    tokens: list = [None] * len(wavs16)
    codes: list = [None] * len(wavs16)
    q16 = int(o.audio_quantum_seconds * SSL_RATE)
    for batch in self._plan([(len(w),) for w in wavs16], (q16,)):
      t0 = time.perf_counter()
      rows = [wavs16[i] for i in batch.indices]
      wav = self._stack(rows, batch.shape[0], np.float32)
      lengths = self._lengths([len(r) for r in rows], batch.shape[0])
      toks, tok_lengths = self._tokenize(wav, lengths)
      for k, i in enumerate(batch.indices):
        tokens[i] = toks[k, :tok_lengths[k]].astype(np.int32)
      if progress:
        progress("tokenize", batch.indices, time.perf_counter() - t0, batch.total)
    with24 = [i for i, w in enumerate(wavs24) if w is not None]
    q24 = length_buckets.round_up(int(o.audio_quantum_seconds * CODEC_RATE), self.hop)
    codec = self.renderer.codec
    encode = self._jitted("codec_encode", lambda p, w, l: generation.codec_call(codec, p, "encode", w, l),
                          self._render_shardings["codec"], 2)
    for batch in self._plan([(len(wavs24[i]),) for i in with24], (q24,)):
      t0 = time.perf_counter()
      rows = [wavs24[with24[j]] for j in batch.indices]
      wav = self._stack(rows, batch.shape[0], np.float32)
      lengths = self._lengths([len(r) for r in rows], batch.shape[0])
      out = self._call(encode, self._render_params["codec"], wav, lengths)
      for k, j in enumerate(batch.indices):
        codes[with24[j]] = out[k, :len(rows[k]) // self.hop].astype(np.int32)
      if progress:
        progress("codec", [with24[j] for j in batch.indices], time.perf_counter() - t0, batch.total)
    return tokens, codes

  @property
  def condition_kind(self) -> str:
    """The frame-level feature the stage-1 model's adapter reads (`config.model.cond_feature`)."""
    return condition_features_lib.kind_of(self.stage1.config) if self.stage1 is not None else ""

  def condition_features(self, wavs16: Sequence[np.ndarray],
                         progress: Optional[ProgressFn] = None) -> list:
    """Condition features `[T, cond_dim]` of each 16 kHz waveform (`condition_features`, the
    model's kind), batched by length. Collective, like `encode_audio`.

    Raises:
      ValueError: the features cannot be computed with the loaded tokenizer, or do not have the
        width the model's adapter reads.
    """
    o = self.options
    kind, dim = self.condition_kind, self.feature_dim
    encoder = self._sharded_tokenizer if self._sharded_tokenizer is not None else self.tokenizer
    width = condition_features_lib.feature_dim(kind, encoder)
    if width is not None and width != dim:
      raise ValueError(f"{self.stage1.source}: the adapter reads {dim}-dim features, but the "
                       f"model's condition feature {kind!r} has {width} (set model.cond_feature)")
    out: list = [None] * len(wavs16)
    q16 = int(o.audio_quantum_seconds * SSL_RATE)
    for batch in self._plan([(len(w),) for w in wavs16], (q16,)):
      t0 = time.perf_counter()
      rows = [wavs16[i] for i in batch.indices]
      wav = self._stack(rows, batch.shape[0], np.float32)
      lengths = self._lengths([len(r) for r in rows], batch.shape[0])
      feats, feat_lengths = condition_features_lib.condition_features(kind, wav, lengths, encoder=encoder)
      for k, i in enumerate(batch.indices):
        out[i] = feats[k, :feat_lengths[k]].astype(np.float32)
      if progress:
        progress("condition", batch.indices, time.perf_counter() - t0, batch.total)
    return out

  # ---------------------------------------------------------------- stage 1

  @property
  def feature_dim(self) -> int:
    """Width of the stage-1 model's frame-level condition (0: no adapter)."""
    return int(self.stage1.config.get("cond_feature_dim", 0) or 0) if self.stage1 is not None else 0

  def _stage1_fn(self, target_len: int, phones: bool, features: bool):
    fn = stage1_call(self._decoder, target_len, phones, features)
    num_args = 4 + 2 * phones + features
    return self._jitted(f"stage1/{target_len}/{phones}/{features}", fn, self._stage1_shardings, num_args)

  def _uses_features(self, items) -> bool:
    """Whether this batch family carries condition frames (the same answer on every process)."""
    own = [it.features is not None for it in items]
    if any(own) and not all(own):
      raise ValueError("some items have condition features and some do not (one task per run)")
    mine = np.asarray([1 if any(own) else 0], np.int32)
    return bool(self.layout.allgather(mine).max()) if self.layout.multiprocess else bool(mine[0])

  def semantic(self, items: Sequence[Stage1Item], progress: Optional[ProgressFn] = None) -> list:
    """Generated SSL tokens `[target_len]` per item."""
    if self._decoder is None:
      raise ValueError("no stage-1 model loaded (--model)")
    o = self.options
    phones = self.uses_phones
    features = self._uses_features(items)
    if features and not self.feature_dim:
      raise ValueError(f"{self.stage1.source}: this task needs a model with a condition adapter "
                       "(a fine-tuned SE/TSE/VC/L2S/Omni model); this one has none")
    out: list = [None] * len(items)
    dims = [(len(it.prompt), it.target_len, len(it.phones) if phones else 0) for it in items]
    quanta = (o.token_quantum, o.token_quantum, o.phone_quantum)

    def dispatch(batch):
      rows = [items[i] for i in batch.indices]
      args = stage1_arrays(rows, batch.shape, self.local_rows, phones,
                           self.feature_dim if features else 0, self._keys([r.key for r in rows]))
      return (self._stage1_fn(batch.shape[1], phones, features), self._stage1_params, *args)

    def collect(batch, tokens, seconds):
      for k, i in enumerate(batch.indices):
        out[i] = tokens[k, :items[i].target_len].astype(np.int32)
      if progress:
        progress("stage1", batch.indices, seconds, batch.total)

    self._in_flight(self._plan(dims, quanta), dispatch, collect)
    return out

  # ---------------------------------------------------------------- stage 2

  def _render_fn(self):
    renderer = self.renderer

    def fn(params, keys, semantic, prompt_lengths, acoustic, target, target_lengths):
      return renderer.apply(params, jax.random.wrap_key_data(keys), semantic, prompt_lengths, acoustic,
                            prompt_lengths, target, target_lengths)

    return self._jitted("render", fn, self._render_shardings, 6)

  def render(self, items: Sequence[RenderItem], progress: Optional[ProgressFn] = None) -> list:
    """(waveform `[T * hop]` float32 at 24 kHz, codes `[T, Q]`) per item."""
    o = self.options
    out: list = [None] * len(items)
    dims = [(len(it.prompt_semantic), len(it.target_semantic)) for it in items]
    q = self.codec_quantizers

    def dispatch(batch):
      rows = [items[i] for i in batch.indices]
      p, t = batch.shape
      return (self._render_fn(), self._render_params, self._keys([r.key for r in rows]),
              self._stack([r.prompt_semantic for r in rows], p, np.int32),
              self._lengths([len(r.prompt_semantic) for r in rows], p),
              self._stack([_columns(r.prompt_acoustic, q) for r in rows], p, np.int32, (q,)),
              self._stack([r.target_semantic for r in rows], t, np.int32),
              self._lengths([len(r.target_semantic) for r in rows], t))

    def collect(batch, outputs, seconds):
      wav, samples, codes = outputs
      for k, i in enumerate(batch.indices):
        n = len(items[i].target_semantic)
        out[i] = (wav[k, :samples[k]].astype(np.float32), codes[k, :n].astype(np.int32))
      if progress:
        progress("render", batch.indices, seconds, batch.total)

    self._in_flight(self._plan(dims, (o.token_quantum, o.token_quantum)), dispatch, collect)
    return out

  # ---------------------------------------------------------------- evaluation

  def _nll_fn(self, phones: bool, features: bool):
    if self._nll is None:
      self._nll = evaluation.make_masked_nll(self.stage1.module)
    nll = self._nll

    def fn(params, keys, prompt, prompt_lengths, target, target_lengths, *rest):
      phone_args = tuple(rest[:2]) if phones else (None, None)
      feats = rest[-1] if features else None
      return nll(params, jax.random.wrap_key_data(keys), prompt, prompt_lengths, target, target_lengths,
                 *phone_args, feats)

    return self._jitted(f"nll/{phones}/{features}", fn, self._stage1_shardings,
                        5 + 2 * phones + features)

  def masked_nll(self, items: Sequence[NLLItem]) -> list:
    """Mean NLL (nats/token) of each item's target SSL tokens under the stage-1 model."""
    if self.stage1 is None:
      raise ValueError("no stage-1 model loaded (--model)")
    o = self.options
    phones = self.uses_phones
    features = self._uses_features(items)
    out: list = [None] * len(items)
    dims = [(len(it.prompt), len(it.target), len(it.phones) if phones else 0) for it in items]
    quanta = (o.token_quantum, o.token_quantum, o.phone_quantum)
    for batch in self._plan(dims, quanta):
      rows = [items[i] for i in batch.indices]
      p, t, n = batch.shape
      args = [self._keys([r.key for r in rows]),
              self._stack([r.prompt for r in rows], p, np.int32),
              self._lengths([len(r.prompt) for r in rows], p),
              self._stack([r.target for r in rows], t, np.int32),
              self._lengths([len(r.target) for r in rows], t)]
      if phones:
        args += [self._stack([r.phones for r in rows], n, np.int32),
                 self._lengths([len(r.phones) for r in rows], n)]
      if features:
        args.append(_stack_features([r.features for r in rows], p + t, self.local_rows, self.feature_dim))
      nll = self._call(self._nll_fn(phones, features), self._stage1_params, *args)
      for k, i in enumerate(batch.indices):
        out[i] = float(nll[k])
    return out


def stage1_arrays(rows: Sequence[Stage1Item], shape: tuple, local_rows: int, phones: bool,
                  feature_dim: int, keys: np.ndarray) -> list:
  """The stage-1 batch of `rows` padded to `shape` = (prompt, target, phones) sizes.

  Returns numpy arrays, `[local_rows, ...]` each: keys, prompt `[., P]`, prompt
  lengths, target lengths, then phones `[., N]` and phone lengths (phone
  models), then features `[., P + T, feature_dim]` (contiguous [prompt; target]
  frames per row; when feature_dim > 0). Missing rows repeat the last one.
  """
  p, t, n = shape
  stack = lambda xs, size, dtype: (length_buckets.stack_padded(xs, size, local_rows, dtype) if xs
                                   else np.zeros((local_rows, size), dtype))
  lengths = lambda xs, full: length_buckets.pad_lengths(list(xs) or [full], local_rows)
  args = [keys, stack([r.prompt for r in rows], p, np.int32), lengths([len(r.prompt) for r in rows], p),
          lengths([r.target_len for r in rows], t)]
  if phones:
    args += [stack([r.phones for r in rows], n, np.int32), lengths([len(r.phones) for r in rows], n)]
  if feature_dim:
    args.append(_stack_features([r.features for r in rows], p + t, local_rows, feature_dim))
  return args


def _stack_features(rows, size: int, local_rows: int, dim: int) -> np.ndarray:
  """`[local_rows, size, dim]` float32 frames (zero-padded; missing rows repeat the last)."""
  for r in rows:
    if r is None or r.ndim != 2 or r.shape[1] != dim:
      raise ValueError(f"condition features must be [frames, {dim}], got "
                       f"{None if r is None else r.shape}")
  if not rows:
    return np.zeros((local_rows, size, dim), np.float32)
  return length_buckets.stack_padded(rows, size, local_rows, np.float32)


def stage1_call(decoder: decoding.MetisDecoder, target_len: int, phones: bool, features: bool):
  """fn(params, keys, prompt, prompt_lengths, target_lengths[, phones, phone_lengths][, features])
  -> `[batch, target_len]` tokens: the arrays of `stage1_arrays` through `decoder`."""

  def fn(params, keys, prompt, prompt_lengths, target_lengths, *rest):
    kwargs = dict(zip(("phones", "phone_lengths"), rest[:2])) if phones else {}
    if features:
      kwargs["features"] = rest[-1]
    return decoder(params, jax.random.wrap_key_data(keys), prompt, prompt_lengths, target_lengths,
                   target_len=target_len, **kwargs)

  return fn


def _columns(codes: np.ndarray, q: int) -> np.ndarray:
  """Codes `[frames, q']` (or empty) -> `[frames, q]`: extra layers dropped, missing ones 0, so
  every process stacks prompts of one width."""
  codes = np.asarray(codes)
  frames = codes.shape[0] if codes.ndim else 0
  codes = codes.reshape(frames, -1) if codes.size else np.zeros((frames, 0), np.int32)
  out = np.zeros((frames, q), np.int32)
  out[:, :min(q, codes.shape[1])] = codes[:, :q]
  return out


def _fit_steps(options: s2a_decoding.S2ADecodeOptions, num_quantizers: int):
  """Step counts cut or padded (with 1s) to the model's number of codec layers."""
  steps = tuple(options.steps)[:num_quantizers]
  steps = steps + (1,) * (num_quantizers - len(steps))
  return dataclasses.replace(options, steps=steps)

