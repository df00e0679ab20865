"""Fine-tuning task data made on the fly: one clean tokenized corpus serves SE, TSE, VC, TTS, L2S and Omni.

Where the audio comes from (choice (a), read it from the source files): the
records stay token-sized, and the tokenization job, run with
`--record_sources` (`tokenize.run(..., record_sources=True)`), writes into
each record the path of its audio file relative to the corpus root (record
field 'src'). The corpus root is `audio_root`, by default the 'input' of the
shard folder's manifest.json. Adding 16 kHz audio to the shards instead would
multiply their size by ~300 (32 kB/s against 100 B/s of tokens); reading the
files is what speech-enhancement toolkits do. WebDataset-tar corpora have no
per-utterance files: extract them to a directory tree first.

Per element (a Grain `RandomMap`, so each example is a pure function of
(seed, index) and a restored iterator is exact):

  target  a record of the (filtered) corpus; its audio is read, resampled to
          16 kHz and checked against its tokens; an utterance longer than
          `max_length - prompt` tokens is cropped on the 320-sample token grid
          (tokens [k, k+L) <-> samples [320k, 320k + 320L + 80)).
  prompt  (TSE, VC, TTS, L2S) another utterance of the same speaker, never the
          target itself: its first P tokens and its first 320 P samples, P
          drawn from `prompt_tokens` (TTS: the whole prompt utterance, whose
          phones go first).
  SE      noisy = clean (reverberated with probability `reverb_prob`) + noise
          at an SNR drawn uniformly from `snr_db`; condition = noisy;
          target = tokens of the clean audio; no prompt.
  TSE     mixture = target + another speaker's utterance at an SIR drawn from
          `sir_db`; condition = [prompt audio; mixture] as one waveform.
  VC      source = the target with its timbre perturbed (`perturb`: pitch
          shift of +-`vc_semitones` and a formant warp); condition =
          [prompt audio; source].
  TTS     phones = [prompt phones; target phones] (records carry phones: the
          tokenize job's phonemizer, `metis_jax.frontend.g2p`); no condition.
  L2S     visual features `<audio stem><visual_suffix>` (float [T25, 768], 25
          fps, written beside the audio by a lip encoder, or under
          `visual_dir` at the audio's relative path), interpolated x2 to
          50 Hz (`condition_features.interpolate_x2`), zero vectors on the
          prompt frames; target tokens cut to the visual length.
  Omni    `grain.MapDataset.mix` of the task datasets with `omni_weights`.

Because the prompt audio is 320 P samples long, the features of [prompt;
mixture] (50 Hz, `tokenizer.num_ssl_frames`) have exactly P + T frames: frame
t of the condition sits on token t of [prompt; target].

Batch (host numpy; b = batch rows, T one of the bucket lengths, S = 320 T + 80
so that num_ssl_frames(S) = T, P_ph a multiple of `phone_bucket`):
  tokens             int32   [b, T]       [prompt tokens; target tokens], 0 at padding
  valid              bool    [b, T]       True on real tokens (a prefix of each row)
  prompt_lengths     int32   [b]          prompt tokens at the front (0 for SE)
  task               int32   [b]          index in TASKS (Omni mixes them)
  with audio conditions (SE/TSE/VC in the pipeline) and features='audio':
  cond_audio         float32 [b, S]       16 kHz condition waveform, 0 after its length
  cond_audio_lengths int32   [b]          samples (0: no condition, e.g. a TTS row of Omni)
  with features='cheap' instead (`condition_features.cheap_condition_features`):
  cond_features      float32 [b, T, 160]  frame t aligned with tokens[:, t]
  cond_lengths       int32   [b]          frames (0: no condition)
  with L2S:
  visual             float32 [b, T, 768]  zeros on prompt frames and padding
  with TTS:
  phones             int32   [b, P_ph]    phone ids, `phone_pad_id` at padding
  phone_valid        bool    [b, P_ph]

Bad or too-short examples (unreadable audio, audio that does not match its
tokens, fewer than `min_tokens` target tokens, a speaker with one utterance,
missing visual features) become error elements; the batcher drops them,
logs the first few and counts them per reason in its checkpointed state
(`skipped`, `skipped_by_reason`): never a crash.
"""

import collections
import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence

import grain
import numpy as np
from absl import logging

from metis_jax.data import audio
from metis_jax.data import condition_features
from metis_jax.data import noise as noise_lib
from metis_jax.data import perturb
from metis_jax.data import records
from metis_jax.data import shards
from metis_jax.data import tokenizer as tk

TASKS = ("se", "tse", "vc", "tts", "l2s")
AUDIO_TASKS = ("se", "tse", "vc")
SAMPLES_PER_TOKEN = tk.HOP * 2  # 320 at 16 kHz.
EDGE = tk.WINDOW - SAMPLES_PER_TOKEN  # 80: num_ssl_frames(320 L + 80) = L.
SR = audio.SSL_SAMPLE_RATE
LOG_FIRST, LOG_EVERY = 10, 100


def samples_for_tokens(n: int) -> int:
  """Samples S with num_ssl_frames(S) = n (320 n + 80; 0 for n = 0)."""
  return SAMPLES_PER_TOKEN * n + EDGE if n > 0 else 0


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """How task examples are made (defaults follow common SE/TSE recipes; see the module doc).

  Attributes:
    max_length: most tokens of [prompt; target] (train.seq_length).
    min_tokens: targets with fewer tokens are skipped (25 = 0.5 s).
    prompt_tokens: (min, max) prompt tokens drawn per example.
    snr_db: SE noise SNR range in dB.
    reverb_prob: SE probability of convolving the clean speech with a room response.
    sir_db: TSE interferer SIR range in dB.
    vc_semitones: VC pitch-shift magnitude range (semitones, random sign).
    vc_formant: VC formant factor drawn log-uniformly in [1/f, f].
    features: 'audio' (batch carries cond_audio; the trainer computes
      w2v-BERT features in the step) or 'cheap' (cond_features, 160-d).
    visual_suffix: L2S features file = audio stem + this.
    visual_dir: '' = visual files beside the audio; else a folder mirroring
      the corpus tree (`visual_dir/<source stem><visual_suffix>`).
    phone_bucket: phone rows are padded to a multiple of this.
    phone_pad_id: phone id at padding (1023, the phone embedding's padding_idx).
    omni_tasks: tasks mixed by Omni.
    omni_weights: their weights (empty = equal).
  """
  max_length: int = 500
  min_tokens: int = 25
  prompt_tokens: tuple[int, int] = (50, 150)
  snr_db: tuple[float, float] = (-5.0, 20.0)
  reverb_prob: float = 0.3
  sir_db: tuple[float, float] = (-5.0, 5.0)
  vc_semitones: tuple[float, float] = (2.0, 5.0)
  vc_formant: float = 1.15
  features: str = "audio"
  visual_suffix: str = ".npy"
  visual_dir: str = ""
  phone_bucket: int = 64
  phone_pad_id: int = 1023
  omni_tasks: tuple[str, ...] = ("se", "tse", "vc", "tts")
  omni_weights: tuple[float, ...] = ()

  def __post_init__(self):
    if self.features not in ("audio", "cheap"):
      raise ValueError(f"error: task features {self.features!r}: use 'audio' or 'cheap'")
    for name in ("prompt_tokens", "snr_db", "sir_db", "vc_semitones"):
      lo, hi = getattr(self, name)
      if lo > hi:
        raise ValueError(f"error: task option {name} = ({lo}, {hi}): the minimum exceeds the maximum")
    if self.prompt_tokens[0] < 1 or self.prompt_tokens[1] + self.min_tokens > self.max_length:
      raise ValueError(f"error: task option prompt_tokens {self.prompt_tokens}: need 1 <= min and "
                       f"max + min_tokens ({self.min_tokens}) <= max_length ({self.max_length})")
    bad = [t for t in self.omni_tasks if t not in TASKS]
    if bad:
      raise ValueError(f"error: task option omni_tasks has unknown tasks {bad}; choose from {TASKS}")
    if self.omni_weights and len(self.omni_weights) != len(self.omni_tasks):
      raise ValueError(f"error: task option omni_weights has {len(self.omni_weights)} weights for "
                       f"{len(self.omni_tasks)} omni_tasks")

  @classmethod
  def from_config(cls, cfg, **overrides) -> "TaskOptions":
    """From a dict / ConfigDict with any of the attribute names (unknown keys are an error)."""
    values = dict(cfg.items() if hasattr(cfg, "items") else cfg)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"error: unknown task options {unknown}; known: {sorted(names)}")
    for k, v in values.items():
      if isinstance(v, list):
        values[k] = tuple(v)
    return cls(**values)


class ExampleError(ValueError):
  """Why one example cannot be made (it is skipped and counted)."""


# ---------------------------------------------------------------------------
# Clean utterances.


@dataclasses.dataclass
class Utterance:
  """A clean utterance: tokens and aligned 16 kHz audio.

  Attributes:
    id: record id.
    speaker: speaker id.
    tokens: int32 [T] SSL tokens.
    wav: float32 [n] at 16 kHz, num_ssl_frames(n) == T.
    phones: int32 [P] or None.
    visual: float32 [T25, 768] or None (L2S).
  """
  id: str
  speaker: str
  tokens: np.ndarray
  wav: np.ndarray
  phones: Optional[np.ndarray] = None
  visual: Optional[np.ndarray] = None


def align_audio(tokens: np.ndarray, wav: np.ndarray, rid: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks that `wav [n]` gives len(tokens) frames (+-1) and trims both to agree."""
  n_tok = len(tokens)
  frames = tk.num_ssl_frames(len(wav))
  if abs(frames - n_tok) > 1:
    raise ExampleError(f"audio of {rid!r} gives {frames} frames but the record has {n_tok} tokens")
  n = min(n_tok, frames)
  return tokens[:n], wav[:min(len(wav), samples_for_tokens(n))]


def crop(utt: Utterance, length: int, rng: np.random.Generator) -> Utterance:
  """At most `length` tokens of `utt` from a random token k, audio on the same 320-sample grid."""
  n = len(utt.tokens)
  if n <= length:
    return utt
  k = int(rng.integers(0, n - length + 1))
  s = SAMPLES_PER_TOKEN * k
  # Phones and visual features no longer match a crop: builders that need them do not crop.
  return dataclasses.replace(utt, tokens=utt.tokens[k:k + length],
                             wav=utt.wav[s:s + samples_for_tokens(length)], visual=None, phones=None)


def prompt_of(utt: Utterance, length: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `length` tokens of `utt` and its first 320 `length` samples (so frames add up)."""
  length = min(length, len(utt.tokens), len(utt.wav) // SAMPLES_PER_TOKEN)
  return utt.tokens[:length], utt.wav[:SAMPLES_PER_TOKEN * length]


def _draw_prompt_length(rng: np.random.Generator, opts: TaskOptions, target_len: int) -> int:
  lo, hi = opts.prompt_tokens
  hi = min(hi, opts.max_length - min(target_len, opts.max_length - lo))
  return int(rng.integers(lo, max(lo, hi) + 1))


def _element(task: str, tokens: Sequence[np.ndarray], prompt_length: int, cond_audio: Optional[np.ndarray] = None,
             phones: Optional[np.ndarray] = None, visual: Optional[np.ndarray] = None,
             parts: Optional[dict] = None) -> dict[str, Any]:
  out = {"task": task, "tokens": np.concatenate(tokens).astype(np.int32), "prompt_length": int(prompt_length),
         "cond_audio": np.zeros((0,), np.float32) if cond_audio is None else cond_audio.astype(np.float32),
         "phones": np.zeros((0,), np.int32) if phones is None else phones.astype(np.int32),
         "visual": visual, "error": ""}
  if parts:
    out["parts"] = parts
  return out


# ---------------------------------------------------------------------------
# Per-task builders: pure functions of (clean utterances, rng) -> element.


def build_se(target: Utterance, rng: np.random.Generator, opts: TaskOptions,
             noises: noise_lib.NoiseBank) -> dict[str, Any]:
  """SE: clean (+ room response) + noise at a drawn SNR; condition = the noisy audio, no prompt.

  Returns an element: tokens int32 [T] (the clean target), prompt_length 0,
  cond_audio float32 [n] (the noisy mixture), and 'parts' {'speech': [n]
  (the clean, possibly reverberant, speech in the mixture), 'noise': [n],
  'snr_db': drawn SNR, 'reverb': bool}.
  """
  target = crop(target, opts.max_length, rng)
  clean = target.wav
  reverb = bool(rng.random() < opts.reverb_prob)
  rir = noises.rir(rng) if reverb else None
  speech = noise_lib.reverberate(clean, rir) if rir is not None else clean
  snr = float(rng.uniform(*opts.snr_db))
  mixture, scaled = noise_lib.mix_at_snr(speech, noises.noise(len(speech), rng), snr)
  mixture, speech, scaled = noise_lib.peak_normalize([mixture, speech, scaled])
  return _element("se", [target.tokens], 0, mixture,
                  parts={"speech": speech, "noise": scaled, "snr_db": snr, "reverb": rir is not None})


def build_tse(target: Utterance, prompt: Utterance, interferer: Utterance, rng: np.random.Generator,
              opts: TaskOptions) -> dict[str, Any]:
  """TSE: target + another speaker at a drawn SIR; condition = [prompt audio; mixture].

  Returns tokens [P + T], prompt_length P, cond_audio [320 P + n], and parts
  {'speech': [n], 'interference': [n], 'sir_db': drawn SIR}.
  """
  if interferer.speaker == target.speaker:
    raise ExampleError(f"interferer {interferer.id!r} has the target's speaker {target.speaker!r}")
  p = _draw_prompt_length(rng, opts, len(target.tokens))
  target = crop(target, opts.max_length - p, rng)
  p_tokens, p_wav = prompt_of(prompt, p)
  other = noise_lib.fit_length(interferer.wav, len(target.wav), rng)
  sir = float(rng.uniform(*opts.sir_db))
  mixture, scaled = noise_lib.mix_at_snr(target.wav, other, sir)
  mixture, speech, scaled, p_wav = noise_lib.peak_normalize([mixture, target.wav, scaled, p_wav])
  return _element("tse", [p_tokens, target.tokens], len(p_tokens), np.concatenate([p_wav, mixture]),
                  parts={"speech": speech, "interference": scaled, "sir_db": sir})


def build_vc(target: Utterance, prompt: Utterance, rng: np.random.Generator, opts: TaskOptions) -> dict[str, Any]:
  """VC: source = the target with its timbre perturbed; condition = [prompt audio; source].

  Returns tokens [P + T], prompt_length P, cond_audio [320 P + n], and parts
  {'source': [n], 'semitones', 'formant_factor'}.
  """
  p = _draw_prompt_length(rng, opts, len(target.tokens))
  target = crop(target, opts.max_length - p, rng)
  p_tokens, p_wav = prompt_of(prompt, p)
  source, draws = perturb.perturb_timbre(target.wav, rng, opts.vc_semitones, opts.vc_formant)
  return _element("vc", [p_tokens, target.tokens], len(p_tokens), np.concatenate([p_wav, source]),
                  parts={"source": source, **draws})


def build_tts(target: Utterance, prompt: Utterance, rng: np.random.Generator, opts: TaskOptions) -> dict[str, Any]:
  """TTS: tokens [prompt; target] of whole utterances, phones [prompt phones; target phones]; no condition."""
  del rng
  for u in (target, prompt):
    if u.phones is None or len(u.phones) == 0:
      raise ExampleError(f"utterance {u.id!r} has no phones (tokenize with a phonemizer)")
  total = len(prompt.tokens) + len(target.tokens)
  if total > opts.max_length:
    raise ExampleError(f"prompt {prompt.id!r} + target {target.id!r} = {total} tokens > max_length "
                       f"{opts.max_length} (TTS does not crop: the phones would no longer match)")
  return _element("tts", [prompt.tokens, target.tokens], len(prompt.tokens),
                  phones=np.concatenate([prompt.phones, target.phones]))


def build_l2s(target: Utterance, prompt: Utterance, rng: np.random.Generator, opts: TaskOptions) -> dict[str, Any]:
  """L2S: visual features x2 (zeros on the prompt frames); tokens [prompt; target].

  Returns tokens [P + L], prompt_length P, visual float32 [P + L, 768] with
  L = min(T, 2 T25) (the target is cut to the visual length).
  """
  if target.visual is None:
    raise ExampleError(f"utterance {target.id!r} has no visual features")
  vis = condition_features.interpolate_x2(target.visual)
  p = _draw_prompt_length(rng, opts, len(target.tokens))
  length = min(len(target.tokens), len(vis), opts.max_length - p)
  k = 0
  if len(target.tokens) > length:
    k = int(rng.integers(0, len(target.tokens) - length + 1))
    k -= k % 2  # Keep token 2j on interpolated frame 2j.
  tokens, vis = target.tokens[k:k + length], vis[k:k + length]
  p_tokens, _ = prompt_of(prompt, p)
  visual = np.concatenate([np.zeros((len(p_tokens), vis.shape[1]), np.float32), vis])
  return _element("l2s", [p_tokens, tokens], len(p_tokens), visual=visual)


# ---------------------------------------------------------------------------
# The corpus: records, speakers and audio.


def _manifest_input(spec: str) -> str:
  path = os.path.join(spec if os.path.isdir(spec) else os.path.dirname(spec), "manifest.json")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)["input"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"error: {path}: cannot read the corpus root ('input') for the records' audio "
                     f"({type(e).__name__}); pass audio_root") from e


@dataclasses.dataclass
class CorpusIndex:
  """What the task transforms need to pick utterances (built once in the main process).

  Attributes:
    speakers: int32 [N] speaker number per record.
    lengths: int32 [N] tokens per record.
    targets: int64 [M] records usable as targets.
    pool: int64 [K] records usable as prompts and interferers.
    by_speaker: speaker number -> int64 [k] pool records of that speaker.
    has_phones: bool [N].
    num_speakers: distinct speakers.
  """
  speakers: np.ndarray
  lengths: np.ndarray
  targets: np.ndarray
  pool: np.ndarray
  by_speaker: dict[int, np.ndarray]
  has_phones: np.ndarray
  num_speakers: int


@dataclasses.dataclass
class RecordTable:
  """Per-record metadata from one scan: ids, speaker numbers, token counts, phones and source flags ([N] each)."""
  ids: list[str]
  speakers: np.ndarray
  lengths: np.ndarray
  has_phones: np.ndarray
  has_source: np.ndarray
  num_speakers: int


def scan_records(raw_records: Sequence[bytes]) -> RecordTable:
  """Reads every record once (ids, speakers, whether it has phones and a source file)."""
  n = len(raw_records)
  names: dict[str, int] = {}
  ids, speakers, lengths = [], np.zeros((n,), np.int32), np.zeros((n,), np.int32)
  has_phones, has_source = np.zeros((n,), bool), np.zeros((n,), bool)
  for i in range(n):
    rec = records.decode(raw_records[i])
    ids.append(rec["id"])
    speakers[i] = names.setdefault(rec["speaker"] or f"<unknown {rec['id']}>", len(names))
    lengths[i] = len(rec["ssl_tokens"])
    has_phones[i] = len(rec.get("phones", ())) > 0
    has_source[i] = "source" in rec
  return RecordTable(ids, speakers, lengths, has_phones, has_source, len(names))


def build_index(table: RecordTable, target_filter: Optional[Callable[[str], bool]] = None,
                pool_filter: Optional[Callable[[str], bool]] = None, need_phones: bool = False,
                need_source: bool = True) -> CorpusIndex:
  """Usable targets and the prompt/interferer pool of a scanned corpus.

  Args:
    table: `scan_records` of the source.
    target_filter: record id -> usable as a target (default all).
    pool_filter: record id -> usable as prompt / interferer (default: the
      target filter).
    need_phones: keep only records with phones (TTS).
    need_source: records must name their audio file (every task but TTS).
  """
  pool_filter = pool_filter or target_filter
  if need_source and len(table.ids) and not table.has_source.any():
    raise ValueError("error: the records name no audio files: tokenize the corpus with `--record_sources` "
                     "(tokenize.run(..., record_sources=True)) for the task pipelines")
  ok = (table.has_phones | (not need_phones)) & (table.has_source | (not need_source))
  is_target = ok & np.array([target_filter is None or target_filter(r) for r in table.ids], bool)
  in_pool = ok & np.array([pool_filter is None or pool_filter(r) for r in table.ids], bool)
  targets, pool = np.flatnonzero(is_target), np.flatnonzero(in_pool)
  if len(targets) == 0:
    raise ValueError("error: no record can be a task target" + (" (none has phones: tokenize with a "
                                                                 "phonemizer)" if need_phones else ""))
  speakers = table.speakers
  by_speaker = {int(sp): pool[speakers[pool] == sp] for sp in np.unique(speakers[pool])}
  return CorpusIndex(speakers, table.lengths, targets, pool, by_speaker, table.has_phones, table.num_speakers)


class CorpusReader:
  """Random access to clean utterances of one shard source (picklable for Grain workers)."""

  def __init__(self, spec: str, audio_root: str = "", visual_suffix: str = ".npy", cache_size: int = 32,
               visual_dir: str = ""):
    self.spec = spec
    self.visual_dir = visual_dir
    self.source = grain.sources.ArrayRecordDataSource(shards.list_shards(spec))
    self._audio_root = audio_root
    self.visual_suffix = visual_suffix
    self.cache_size = cache_size
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = collections.OrderedDict()
    return state

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> bytes:
    return self.source[i]

  @property
  def audio_root(self) -> str:
    if not self._audio_root:
      self._audio_root = _manifest_input(self.spec)
    return self._audio_root

  def audio_path(self, rec: dict) -> str:
    if "source" not in rec:
      raise ExampleError(f"record {rec['id']!r} names no audio file (tokenize with --record_sources)")
    return os.path.join(self.audio_root, rec["source"])

  def utterance(self, i: int, visual: bool = False, with_audio: bool = True) -> Utterance:
    """Record `i` with its 16 kHz audio (and visual features); raises ExampleError if unusable.

    Without `with_audio` the utterance has tokens and phones only (wav empty).
    """
    key = (int(i), visual, with_audio)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    rec = records.decode(self.source[int(i)])
    if not with_audio:
      phones = rec.get("phones")
      return Utterance(rec["id"], rec["speaker"], np.asarray(rec["ssl_tokens"], np.int32), np.zeros((0,), np.float32),
                       None if phones is None else np.asarray(phones, np.int32))
    path = self.audio_path(rec)
    try:
      waves, _ = audio.load(path, (SR,))
    except (audio.AudioError, OSError) as e:
      raise ExampleError(str(e)) from e
    tokens, wav = align_audio(np.asarray(rec["ssl_tokens"], np.int32), waves[SR], rec["id"])
    feats = None
    if visual:
      base = os.path.join(self.visual_dir, rec["source"]) if self.visual_dir else path
      vpath = os.path.splitext(base)[0] + self.visual_suffix
      try:
        feats = np.load(vpath).astype(np.float32)
      except (OSError, ValueError) as e:
        raise ExampleError(f"no visual features at {vpath} ({type(e).__name__})") from e
      if feats.ndim != 2:
        raise ExampleError(f"{vpath}: visual features must be [frames, dim], got {feats.shape}")
    phones = rec.get("phones")
    utt = Utterance(rec["id"], rec["speaker"], tokens, wav,
                    None if phones is None else np.asarray(phones, np.int32), feats)
    self._cache[key] = utt
    while len(self._cache) > self.cache_size:
      self._cache.popitem(last=False)
    return utt


# ---------------------------------------------------------------------------
# The Grain transform.


class TaskTransform(grain.transforms.RandomMap):
  """Target record index -> a task element (or an error element); see the module doc."""

  def __init__(self, task: str, reader: CorpusReader, index: CorpusIndex, opts: TaskOptions,
               noises: Optional[noise_lib.NoiseBank] = None, keep_parts: bool = False):
    if task not in TASKS:
      raise ValueError(f"error: unknown task {task!r}; choose from {TASKS}")
    if task == "se" and (noises is None or not noises.noise_files):
      raise ValueError("error: the SE task needs noise: set noise_dirs (a DNS/MUSAN/WHAM!-style folder)")
    self.task, self.reader, self.index, self.opts = task, reader, index, opts
    self.noises, self.keep_parts = noises, keep_parts

  def _prompt_index(self, target: int, rng: np.random.Generator) -> int:
    same = self.index.by_speaker.get(int(self.index.speakers[target]), np.zeros((0,), np.int64))
    same = same[same != target]
    if self.task == "tts":  # Whole utterances: the prompt must fit beside the target.
      fits = same[self.index.lengths[same] <= self.opts.max_length - self.index.lengths[target]]
      same = fits if len(fits) else same
    if len(same) == 0:
      raise ExampleError("the target's speaker has no other utterance for a prompt")
    return int(same[rng.integers(len(same))])

  def _interferer_index(self, target: int, rng: np.random.Generator) -> int:
    pool = self.index.pool
    for _ in range(64):
      j = int(pool[rng.integers(len(pool))])
      if self.index.speakers[j] != self.index.speakers[target]:
        return j
    raise ExampleError("no utterance of another speaker for an interferer")

  def build(self, target_index: int, rng: np.random.Generator) -> dict[str, Any]:
    """The element for one target record (raises ExampleError / AudioError when unusable)."""
    task, opts = self.task, self.opts
    with_audio = task != "tts"
    target = self.reader.utterance(target_index, visual=task == "l2s", with_audio=with_audio)
    if len(target.tokens) < opts.min_tokens:
      raise ExampleError(f"too short: {target.id!r} has {len(target.tokens)} tokens < min_tokens "
                         f"{opts.min_tokens}")
    if task == "se":
      return build_se(target, rng, opts, self.noises)
    prompt = self.reader.utterance(self._prompt_index(target_index, rng), with_audio=with_audio)
    if task == "tse":
      interferer = self.reader.utterance(self._interferer_index(target_index, rng))
      return build_tse(target, prompt, interferer, rng, opts)
    if task == "vc":
      return build_vc(target, prompt, rng, opts)
    if task == "tts":
      return build_tts(target, prompt, rng, opts)
    return build_l2s(target, prompt, rng, opts)

  def random_map(self, element, rng: np.random.Generator):
    target_index = int(element)
    try:
      out = self.build(target_index, rng)
    except (ExampleError, audio.AudioError, OSError, ValueError) as e:
      return {"task": self.task, "error": str(e) or type(e).__name__}
    if not self.keep_parts:
      out.pop("parts", None)
    if self.opts.features == "cheap" and len(out["cond_audio"]):
      feats, _ = condition_features.cheap_condition_features(out["cond_audio"][None],
                                                             np.array([len(out["cond_audio"])]))
      out["cond_features"] = feats[0][:len(out["tokens"])]
    return out


# ---------------------------------------------------------------------------
# Batching with skip counts.


def _skip_category(reason: str) -> str:
  for c in ("too short", "frames but the record has", "no visual features", "no phones", "no other utterance",
            "another speaker", "names no audio", "> max_length", "cannot decode", "silent", "empty audio",
            "non-finite", "No such file"):
    if c in reason:
      return c
  return "other"


def collate(elements: Sequence[dict[str, Any]], batch_size: int, buckets: Sequence[int], tasks: Sequence[str],
            opts: TaskOptions) -> dict[str, np.ndarray]:
  """Pads task elements into the batch of the module doc (rows past len(elements) are padding)."""
  longest = max(len(e["tokens"]) for e in elements)
  length = next((b for b in buckets if b >= longest), None)
  if length is None:
    raise ValueError(f"a task example of {longest} tokens exceeds the largest bucket {buckets[-1]}")
  b = batch_size
  out = {"tokens": np.zeros((b, length), np.int32), "valid": np.zeros((b, length), bool),
         "prompt_lengths": np.zeros((b,), np.int32), "task": np.zeros((b,), np.int32)}
  audio_cond = any(t in AUDIO_TASKS for t in tasks)
  if audio_cond and opts.features == "audio":
    out["cond_audio"] = np.zeros((b, samples_for_tokens(length)), np.float32)
    out["cond_audio_lengths"] = np.zeros((b,), np.int32)
  elif audio_cond:
    out["cond_features"] = np.zeros((b, length, condition_features.CHEAP_DIM), np.float32)
    out["cond_lengths"] = np.zeros((b,), np.int32)
  if "l2s" in tasks:
    out["visual"] = np.zeros((b, length, condition_features.VISUAL_DIM), np.float32)
  if "tts" in tasks:
    most = max(len(e["phones"]) for e in elements)
    p_len = max(opts.phone_bucket, -(-most // opts.phone_bucket) * opts.phone_bucket)
    out["phones"] = np.full((b, p_len), opts.phone_pad_id, np.int32)
    out["phone_valid"] = np.zeros((b, p_len), bool)
  for r, e in enumerate(elements):
    n = len(e["tokens"])
    out["tokens"][r, :n] = e["tokens"]
    out["valid"][r, :n] = True
    out["prompt_lengths"][r] = e["prompt_length"]
    out["task"][r] = TASKS.index(e["task"])
    if "cond_audio" in out:
      m = min(len(e["cond_audio"]), out["cond_audio"].shape[1])
      out["cond_audio"][r, :m] = e["cond_audio"][:m]
      out["cond_audio_lengths"][r] = m
    if "cond_features" in out and "cond_features" in e:
      f = e["cond_features"][:length]
      out["cond_features"][r, :len(f)] = f
      out["cond_lengths"][r] = len(f)
    if "visual" in out and e.get("visual") is not None:
      v = e["visual"][:length]
      out["visual"][r, :len(v), :v.shape[1]] = v
    if "phones" in out:
      p = e["phones"]
      out["phones"][r, :len(p)] = p
      out["phone_valid"][r, :len(p)] = True
  return out


class TaskBatchIterDataset(grain.IterDataset):
  """Batches task elements, dropping (and counting) error elements."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, buckets: Sequence[int], tasks: Sequence[str],
               opts: TaskOptions):
    super().__init__(parent)
    self.batch_size, self.buckets, self.tasks, self.opts = batch_size, tuple(buckets), tuple(tasks), opts

  def __iter__(self) -> "TaskBatchIterator":
    return TaskBatchIterator(self._parent.__iter__(), self)

  def __str__(self):
    return f"TaskBatchIterDataset(batch_size={self.batch_size}, tasks={self.tasks}, buckets={self.buckets})"


class TaskBatchIterator(grain.DatasetIterator):
  """State: the parent's state, `skipped` and `skipped_by_reason` (restored exactly)."""

  def __init__(self, parent: grain.DatasetIterator, ds: TaskBatchIterDataset):
    super().__init__(parent)
    self._ds = ds
    self.skipped = 0
    self.skipped_by_reason: dict[str, int] = {}

  def _skip(self, element: dict[str, Any]) -> None:
    self.skipped += 1
    cat = f"{element['task']}: {_skip_category(element['error'])}"
    self.skipped_by_reason[cat] = self.skipped_by_reason.get(cat, 0) + 1
    if self.skipped <= LOG_FIRST or self.skipped % LOG_EVERY == 0:
      logging.warning("skipped task example #%d (%s): %s", self.skipped, element["task"], element["error"])

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    ds = self._ds
    elements, misses = [], 0
    while len(elements) < ds.batch_size:
      element = next(self._parent)
      if element["error"]:
        self._skip(element)
        misses += 1
        if misses > 1000 and not elements:
          raise RuntimeError(f"the last {misses} task examples could not be made; the latest: {element['error']}")
        continue
      elements.append(element)
    return collate(elements, ds.batch_size, ds.buckets, ds.tasks, ds.opts)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped": self.skipped,
            "skipped_by_reason": dict(self.skipped_by_reason)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.skipped = int(state.get("skipped", 0))
    self.skipped_by_reason = dict(state.get("skipped_by_reason", {}))


# ---------------------------------------------------------------------------
# Assembly.


def task_element_dataset(task: str, source: str, opts: TaskOptions, *, seed: int = 0, num_epochs: int = 0,
                         audio_root: str = "", noise_dirs: Sequence[str] = (), rir_dirs: Sequence[str] = (),
                         target_filter: Optional[Callable[[str], bool]] = None,
                         pool_filter: Optional[Callable[[str], bool]] = None,
                         keep_parts: bool = False, noises: Optional[noise_lib.NoiseBank] = None,
                         table: Optional[RecordTable] = None) -> grain.MapDataset:
  """Elements of one task (before process slicing and batching): a MapDataset of dicts.

  'omni' gives the `grain.MapDataset.mix` of `opts.omni_tasks` with
  `opts.omni_weights`, each task with its own shuffle and transform seed.
  """
  if task == "omni":
    if table is None:
      table = scan_records(CorpusReader(source, audio_root))
    parts = [task_element_dataset(t, source, opts, seed=seed + 1009 * (i + 1), num_epochs=num_epochs,
                                  audio_root=audio_root, noise_dirs=noise_dirs, rir_dirs=rir_dirs,
                                  target_filter=target_filter, pool_filter=pool_filter, keep_parts=keep_parts,
                                  noises=noises, table=table)
             for i, t in enumerate(opts.omni_tasks)]
    return grain.MapDataset.mix(parts, list(opts.omni_weights) or None)
  reader = CorpusReader(source, audio_root, opts.visual_suffix, visual_dir=opts.visual_dir)
  table = table if table is not None else scan_records(reader)
  index = build_index(table, target_filter, pool_filter, need_phones=task == "tts", need_source=task != "tts")
  if task == "se" and noises is None:
    noises = noise_lib.NoiseBank(noise_dirs, rir_dirs)
  transform = TaskTransform(task, reader, index, opts, noises, keep_parts)
  ds = grain.MapDataset.source(index.targets).shuffle(seed=seed)
  ds = ds.repeat(num_epochs if num_epochs > 0 else None)
  return ds.random_map(transform, seed=seed + 1)


def tasks_of(task: str, opts: TaskOptions) -> tuple[str, ...]:
  """The tasks whose keys a batch of `task` carries."""
  return tuple(opts.omni_tasks) if task == "omni" else (task,)


def make_task_iterator(task: str, source: str, opts: TaskOptions, *, batch_size: int, seed: int = 0,
                       num_epochs: int = 0, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                       worker_buffer_size: int = 1, buckets: Sequence[int] = (), audio_root: str = "",
                       noise_dirs: Sequence[str] = (), rir_dirs: Sequence[str] = (),
                       target_filter: Optional[Callable[[str], bool]] = None,
                       pool_filter: Optional[Callable[[str], bool]] = None) -> TaskBatchIterator:
  """This host's task batches (module doc): a checkpointable `grain.DatasetIterator`.

  Args:
    task: one of TASKS or 'omni'.
    source: the shard folder (records with 'src'; see the module doc).
    opts: `TaskOptions`.
    batch_size: rows per host batch.
    seed: data seed (shuffle, draws); with the element index it fixes every example.
    num_epochs: passes over the targets; 0 = forever.
    process_index: this host's slice.
    process_count: number of hosts.
    num_workers: Grain worker processes (0 = in this process).
    worker_buffer_size: per-worker prefetch.
    buckets: padded token lengths (increasing, the last = opts.max_length);
      empty = 4 equal steps.
    audio_root: corpus root of the records' 'src' (default: the manifest's input).
    noise_dirs: SE noise folders.
    rir_dirs: SE room-response folders.
    target_filter: record id -> usable as a target.
    pool_filter: record id -> usable as a prompt / interferer.
  """
  from metis_jax.data import batches, bucketing  # pylint: disable=g-import-not-at-top
  buckets = bucketing.check_buckets(buckets or bucketing.default_buckets(opts.max_length), opts.max_length)
  ds = task_element_dataset(task, source, opts, seed=seed, num_epochs=num_epochs, audio_root=audio_root,
                            noise_dirs=noise_dirs, rir_dirs=rir_dirs, target_filter=target_filter,
                            pool_filter=pool_filter)
  ds = ds[process_index::process_count]
  it_ds = batches.host_iter_dataset(ds, grain.ReadOptions(num_threads=2, prefetch_buffer_size=16),
                                    num_workers, worker_buffer_size)
  return iter(TaskBatchIterDataset(it_ds, batch_size, buckets, tasks_of(task, opts), opts))
