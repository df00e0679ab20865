"""Generation tasks: what an example's fields mean and how it becomes a generation job.

An open registry (`TASKS`: name -> Task class, `register_task`): a task turns
one example (a manifest line, or the single-example flags) into a `Job` —
its prompt audio and text, and the chunks to generate, each with its text,
phones and number of tokens — and declares its reference decoding defaults
(spec §6). The engine and the command line are shared by all tasks.

Registered:
  continue  speech continuation: prompt audio -> more speech in the same
            voice (stage 1 without text; for the Metis base model).
  tts       zero-shot TTS: prompt audio + its transcript + text (phone models:
            MaskGCT T2S, Metis TTS).
  resynth   stage 2 only: the SSL tokens of a clip re-rendered by S2A and the
            codec after its first seconds as acoustic prompt (or another
            clip's), with the clip as a clean reference.
  se        speech enhancement: `wav` (noisy) -> clean speech; no prompt; as
            many tokens as the input has frames (spec §8).
  tse       target speaker extraction: `wav` (mixture) + `prompt_wav`
            (enrollment) -> the prompt speaker's speech in the mixture.
  vc        voice conversion: `wav` (source) + `prompt_wav` (target speaker).
            se / tse / vc condition the fine-tuned model (adapter) on
            frame-level features of 16 kHz audio (`condition_features`): of
            the input (se), of concat(prompt, input) as ONE waveform (tse,
            vc; prompt tokens from the prompt alone, target = frames -
            prompt tokens). Inputs longer than `window_seconds` run in
            overlapping windows joined in the waveform (`windows`).
  l2s       lip to speech: `visual_features` (.npy, [frames, 768] at 25 fps)
            interpolated x2 to 50 Hz, zero frames on the optional prompt.
  omni      one Omni model serving tts / se / tse / vc (`omni_task`).
"""

import dataclasses
import math
import os
from typing import Callable, Optional

import numpy as np

from metis_jax.frontend import g2p as g2p_lib
from metis_jax.frontend import target_length, text_split, visual_features
from metis_jax.data import audio as audio_lib
from metis_jax.inference import windows as windows_lib

TOKENS_PER_SECOND = target_length.TOKENS_PER_SECOND
METIS_S2A_STEPS = (40, 16) + (1,) * 10
MASKGCT_S2A_STEPS = (25, 10) + (1,) * 10


class ExampleError(ValueError):
  """An example that cannot be generated; the message names the file or field."""


@dataclasses.dataclass(frozen=True)
class DecodeDefaults:
  """Reference decoding settings of a task (spec §6). Stage-1 temperature 0.9, S2A 1.5."""
  steps: int = 25
  cfg: float = 2.5
  rescale_cfg: float = 0.75
  temperature: float = 0.9
  s2a_steps: tuple = METIS_S2A_STEPS      # the full S2A model (layer 0's entry unused with a 1-layer model)
  s2a_cfg: float = 2.5
  s2a_first_steps: int = 40               # the 1-layer S2A model
  s2a_first_cfg: float = 0.0              # Metis: 0; MaskGCT: 2.5
  s2a_rescale_cfg: float = 0.75
  s2a_temperature: float = 1.5


# Reference defaults per task (Metis). MaskGCT's TTS recipe differs only in S2A:
# [25, 10, 1 x 10] with CFG 2.5 for both S2A models (`MASKGCT_TTS`).
DECODE_DEFAULTS = {
    "tts": DecodeDefaults(steps=25, cfg=2.5),
    "continue": DecodeDefaults(steps=25, cfg=2.5),  # no reference recipe: TTS's
    "resynth": DecodeDefaults(),                     # stage 2 only
    "vc": DecodeDefaults(steps=20, cfg=1.0),
    "se": DecodeDefaults(steps=10, cfg=0.0),
    "tse": DecodeDefaults(steps=10, cfg=0.0),
    "l2s": DecodeDefaults(steps=25, cfg=2.5),
}
CONDITION_TASKS = ("se", "tse", "vc")
OMNI_TASKS = ("tts", "se", "tse", "vc")
OUTPUT_HOP = 480  # 24 kHz samples per 50 Hz token
MASKGCT_TTS = DecodeDefaults(steps=25, cfg=2.5, s2a_steps=MASKGCT_S2A_STEPS, s2a_first_steps=25,
                             s2a_first_cfg=2.5)


@dataclasses.dataclass
class TaskSettings:
  """Run-wide settings tasks read (from the command line)."""
  language: str = "en"
  prompt_language: str = ""         # '' = language
  target_seconds: float = 0.0       # 0 = estimate
  length_rule: str = "phone_rate"
  chunk_seconds: float = 15.0
  max_prompt_seconds: float = 20.0
  prompt_seconds: float = 3.0        # resynth: head of the clip used as prompt
  min_target_seconds: float = 0.5   # resynth: the shortest rest of the clip worth rendering
  window_seconds: float = 20.0      # se / tse / vc: longest input decoded in one call (0 = no windows)
  window_overlap_seconds: float = 1.0  # crossfaded overlap of neighbouring windows
  omni_task: str = "tts"            # omni: the task it serves
  visual_feature_dim: int = 768     # l2s: width of the visual features (the model's adapter input)


@dataclasses.dataclass
class Example:
  """One example: its position, id, fields (paths resolved) and output path.

  `seed_id` names its random stream (default: the id), so an example's output
  depends on the seed and on it, not on its position or batch mates.
  """
  index: int
  id: str
  fields: dict
  out_path: str
  seed_id: str = ""

  @property
  def stream_name(self) -> str:
    return self.seed_id or self.id


@dataclasses.dataclass
class Chunk:
  """One piece generated in one go."""
  tokens: int
  text: Optional[str] = None
  phones: Optional[np.ndarray] = None      # ids of `text` (phone models)
  semantic: Optional[np.ndarray] = None    # target SSL tokens: given (resynth) or generated
  audio: Optional[np.ndarray] = None
  codes: Optional[np.ndarray] = None
  # Condition tasks: the 16 kHz audio whose features condition this chunk ([prompt; input window]
  # for tse / vc, the window for se), or the target's own frames (l2s; prompt frames are zeros).
  condition_wav16: Optional[np.ndarray] = None
  target_features: Optional[np.ndarray] = None
  features: Optional[np.ndarray] = None    # [prompt + tokens, dim], what the decoder reads
  offset: int = 0                          # start of this chunk's audio in the output (24 kHz samples)


@dataclasses.dataclass
class Job:
  """An example on its way through the engine."""
  example: Example
  task: str
  chunks: list
  prompt_wav16: Optional[np.ndarray] = None
  prompt_wav24: Optional[np.ndarray] = None
  prompt_text: Optional[str] = None
  prompt_phones: Optional[np.ndarray] = None
  prompt_semantic: Optional[np.ndarray] = None     # [P]
  prompt_acoustic: Optional[np.ndarray] = None     # [P, Q]
  # Source clip whose SSL tokens are rendered (resynth): 16 kHz waveform.
  source_wav16: Optional[np.ndarray] = None
  # Time-aligned clean reference of the output (24 kHz), for SI-SNR / mel distance.
  reference_wav24: Optional[np.ndarray] = None
  # Reference speech of the target (16 kHz) whose SSL tokens are scored (NLL).
  reference_wav16: Optional[np.ndarray] = None
  reference_semantic: Optional[np.ndarray] = None
  text: Optional[str] = None                        # what the output says (for WER)
  # The example's input audio (se / tse / vc), 24 kHz, for the report's players and baseline measures;
  # at 16 kHz when a reference is scored (its SSL tokens: the input's token accuracy).
  input_wav24: Optional[np.ndarray] = None
  input_wav16: Optional[np.ndarray] = None
  input_semantic: Optional[np.ndarray] = None
  # Chunks conditioned independently (windows of one input, all on the original prompt), joined by
  # crossfading at their `offset`s; otherwise each chunk continues the previous one.
  independent_chunks: bool = False
  language: str = "en"
  info: dict = dataclasses.field(default_factory=dict)
  error: Optional[str] = None
  wall_seconds: float = 0.0

  @property
  def target_tokens(self) -> int:
    return sum(c.tokens for c in self.chunks)


class Context:
  """What a task may use while preparing an example."""

  def __init__(self, settings: TaskSettings, g2p_factory: Callable[[], g2p_lib.G2P],
               uses_phones: bool, has_stage1: bool):
    self.settings = settings
    self._g2p_factory = g2p_factory
    self._g2p = None
    self.uses_phones = uses_phones
    self.has_stage1 = has_stage1
    self._phone_cache: dict = {}

  @property
  def g2p(self) -> g2p_lib.G2P:
    if self._g2p is None:
      self._g2p = self._g2p_factory()
    return self._g2p

  def phones(self, text: str, language: str, field: str) -> np.ndarray:
    """Phone ids of `text` (cached: chunking asks for the same pieces repeatedly)."""
    key = (text, language)
    if key not in self._phone_cache:
      try:
        self._phone_cache[key] = np.asarray(self.g2p(text, language), np.int32)
      except g2p_lib.G2PError as e:
        raise ExampleError(f"{field}: {e}") from e
      if len(self._phone_cache) > 4096:
        self._phone_cache.pop(next(iter(self._phone_cache)))
    return self._phone_cache[key]


def load_audio(path: Optional[str], field: str, rates=(16000, 24000)) -> dict:
  """{rate: waveform} of a file of any rate / channel count; ExampleError naming the file."""
  if not path:
    raise ExampleError(f"missing '{field}' (an audio file)")
  if not os.path.exists(path):
    raise ExampleError(f"{field}: {path}: no such file")
  try:
    waves, _ = audio_lib.load(path, rates=tuple(rates), silence_threshold_db=-100.0)
  except audio_lib.AudioError as e:
    raise ExampleError(f"{field}: {e}") from e
  except OSError as e:
    raise ExampleError(f"{field}: {path}: cannot read ({e})") from e
  return waves


def _seconds(x: np.ndarray, rate: int) -> float:
  return len(x) / rate


def _text_field(example: Example, name: str, required: bool = True) -> Optional[str]:
  value = example.fields.get(name)
  if value is None or (isinstance(value, str) and not value.strip()):
    if required:
      raise ExampleError(f"empty text: '{name}' is missing or blank")
    return None
  if not isinstance(value, str):
    raise ExampleError(f"'{name}' must be a string, got {type(value).__name__}")
  return value.strip()


def _positive_float(example: Example, name: str, default: float) -> float:
  value = example.fields.get(name)
  if value in (None, ""):
    return default
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ExampleError(f"'{name}' must be a number, got {value!r}") from e
  if not value > 0:
    raise ExampleError(f"'{name}' must be positive, got {value}")
  return value


class Task:
  """Base of a generation task. Subclasses set `name`, `defaults` and `prepare`."""
  name = ""
  uses_stage1 = True
  needs_text = False
  needs_adapter = False   # needs a fine-tuned model with a condition adapter

  @property
  def defaults_name(self) -> str:
    """The `DECODE_DEFAULTS` entry of this task."""
    return self.name

  @property
  def defaults(self) -> DecodeDefaults:
    return DECODE_DEFAULTS[self.defaults_name]

  def configure(self, settings: "TaskSettings") -> None:
    """Run-wide settings known before any example (Omni's sub-task)."""
    del settings

  def prepare(self, example: Example, ctx: Context) -> Job:
    raise NotImplementedError

  # Shared pieces.

  def _prompt(self, job: Job, example: Example, ctx: Context, field: str = "prompt_wav") -> None:
    waves = load_audio(example.fields.get(field), field)
    job.prompt_wav16, job.prompt_wav24 = waves[16000], waves[24000]
    seconds = _seconds(job.prompt_wav24, 24000)
    limit = ctx.settings.max_prompt_seconds
    if seconds > limit:
      raise ExampleError(f"{field}: {example.fields.get(field)}: prompt too long for the model "
                         f"({seconds:.1f} s > {limit:g} s, --max_prompt_seconds); use a 3-10 s clip")
    if seconds * TOKENS_PER_SECOND < 1:
      raise ExampleError(f"{field}: {example.fields.get(field)}: prompt too short ({seconds:.3f} s)")
    job.info["prompt_seconds"] = round(seconds, 3)

  def _reference(self, job: Job, example: Example) -> None:
    if example.fields.get("reference_wav"):
      waves = load_audio(example.fields["reference_wav"], "reference_wav", rates=(16000,))
      job.reference_wav16 = waves[16000]


def _duration_chunks(total: int, chunk_tokens: int) -> list:
  n = max(1, math.ceil(total / chunk_tokens))
  return [Chunk(tokens=t) for t in target_length.split_tokens(total, [1.0] * n)]


TASKS: dict[str, type] = {}


def register_task(cls):
  """Class decorator adding a Task to `TASKS` under `cls.name`."""
  if not cls.name:
    raise ValueError(f"{cls.__name__} has no name")
  TASKS[cls.name] = cls
  return cls


def get_task(name: str) -> Task:
  if name not in TASKS:
    known = ", ".join(sorted(TASKS))
    if name in DECODE_DEFAULTS:
      raise ValueError(f"task {name!r} is not wired yet (it needs the adapter features, spec §8); "
                       f"available: {known}")
    raise ValueError(f"unknown task {name!r}; available: {known}")
  return TASKS[name]()


@register_task
class ContinueTask(Task):
  """Prompt audio -> its continuation (no text). Length: `target_seconds`, else the reference's,
  else as long as the prompt. Long targets are generated in chunks."""
  name = "continue"

  def prepare(self, example: Example, ctx: Context) -> Job:
    job = Job(example, self.name, [])
    self._prompt(job, example, ctx)
    self._reference(job, example)
    s = ctx.settings
    seconds = _positive_float(example, "target_seconds", s.target_seconds)
    if seconds:
      total = target_length.seconds_to_tokens(seconds)
    elif job.reference_wav16 is not None:
      total = max(1, int(round(_seconds(job.reference_wav16, 16000) * TOKENS_PER_SECOND)))
    else:
      total = max(1, int(round(job.info["prompt_seconds"] * TOKENS_PER_SECOND)))
    job.chunks = _duration_chunks(total, int(s.chunk_seconds * TOKENS_PER_SECOND))
    if ctx.uses_phones:  # a phone model continues without phones (its unconditional branch)
      job.prompt_phones = np.zeros((0,), np.int32)
      for c in job.chunks:
        c.phones = np.zeros((0,), np.int32)
    job.text = _text_field(example, "text", required=False)
    return job


@register_task
class TTSTask(Task):
  """Prompt audio + prompt text + text -> speech of the text in the prompt's voice.

  Length: `target_seconds`, else the length rule (phone_rate: MaskGCT,
  byte_rate: Metis) on the prompt. Text longer than `chunk_seconds` (as
  estimated) is split at sentences and generated chunk by chunk.
  """
  name = "tts"
  needs_text = True

  def prepare(self, example: Example, ctx: Context) -> Job:
    if not ctx.uses_phones:
      raise ExampleError("the stage-1 model has no phone condition: use a TTS model "
                         "(MaskGCT T2S / Metis TTS) or --task continue")
    s = ctx.settings
    text = _text_field(example, "text")
    prompt_text = _text_field(example, "prompt_text")
    language = example.fields.get("language") or s.language
    prompt_language = example.fields.get("prompt_language") or s.prompt_language or language
    try:
      language = g2p_lib.normalize_language(language)
      prompt_language = g2p_lib.normalize_language(prompt_language)
    except g2p_lib.G2PError as e:
      raise ExampleError(str(e)) from e
    job = Job(example, self.name, [], text=text, prompt_text=prompt_text, language=language)
    job.prompt_phones = ctx.phones(prompt_text, prompt_language, "prompt_text")
    # Validate the whole text before loading audio (cheap errors first).
    full_phones = ctx.phones(text, language, "text")
    self._prompt(job, example, ctx)
    self._reference(job, example)
    prompt_seconds = _seconds(job.prompt_wav16, 16000)
    prompt_tokens = int(np.asarray(_num_ssl(len(job.prompt_wav16))))

    def estimate(piece: str, phones: Optional[np.ndarray] = None) -> int:
      if s.length_rule == "byte_rate":
        return target_length.byte_rate_tokens(prompt_tokens, piece, prompt_text)
      if phones is None:
        phones = ctx.phones(piece, language, "text")
      return target_length.phone_rate_tokens(prompt_seconds, len(job.prompt_phones), len(phones))

    if s.length_rule not in target_length.RULES:
      raise ValueError(f"unknown length rule {s.length_rule!r}; expected one of {target_length.RULES}")
    seconds = _positive_float(example, "target_seconds", s.target_seconds)
    byte_rule = s.length_rule == "byte_rate"

    def size(piece: str, phones: Optional[np.ndarray] = None) -> int:
      if byte_rule:
        return len(piece.encode("utf-8"))
      return len(phones if phones is not None else ctx.phones(piece, language, "text"))

    if seconds:  # the requested tokens, spread over the text in proportion to its size
      total = target_length.seconds_to_tokens(seconds)
      per_unit = total / max(1, size(text, full_phones))
      cost = lambda piece: per_unit * size(piece)
    else:
      cost = estimate
    pieces = text_split.split_text(text, cost, s.chunk_seconds * TOKENS_PER_SECOND)
    phones = [full_phones] if len(pieces) == 1 else [ctx.phones(p, language, "text") for p in pieces]
    if seconds:
      if total < len(pieces):
        raise ExampleError(f"target_seconds {seconds:g} is too short for {len(pieces)} chunks")
      tokens = target_length.split_tokens(total, [size(p, ph) for p, ph in zip(pieces, phones)])
    else:
      tokens = [estimate(p, ph) for p, ph in zip(pieces, phones)]
    job.chunks = [Chunk(tokens=t, text=p, phones=ph) for p, ph, t in zip(pieces, phones, tokens)]
    job.info.update(language=language, length_rule=s.length_rule if not seconds else "seconds")
    return job


@register_task
class ResynthTask(Task):
  """A clip's SSL tokens re-rendered by S2A + codec.

  Fields: `wav` (the clip); optional `prompt_wav` (another clip as acoustic
  prompt: the whole clip is rendered). Without it, the first `prompt_seconds`
  of the clip are the prompt and the rest is rendered and compared with the
  original (SI-SNR, mel distance); with a stage-1 model, the rest's SSL
  tokens are also scored (NLL) given the first part.
  """
  name = "resynth"
  uses_stage1 = False

  def prepare(self, example: Example, ctx: Context) -> Job:
    s = ctx.settings
    field = "wav" if example.fields.get("wav") else "source_wav"
    waves = load_audio(example.fields.get(field), "wav")
    job = Job(example, self.name, [], text=_text_field(example, "text", required=False))
    job.source_wav16 = waves[16000]
    wav24 = waves[24000]
    if example.fields.get("prompt_wav"):
      self._prompt(job, example, ctx)
      job.info["split"] = "separate prompt"
    else:
      prompt_seconds = _positive_float(example, "prompt_seconds", s.prompt_seconds)
      total = _seconds(wav24, 24000)
      if total < prompt_seconds + s.min_target_seconds:
        raise ExampleError(f"wav: {example.fields.get(field)}: {total:.2f} s is too short to keep "
                           f"{prompt_seconds:g} s as prompt and render the rest")
      if prompt_seconds > s.max_prompt_seconds:
        raise ExampleError(f"prompt too long for the model ({prompt_seconds:g} s > "
                           f"{s.max_prompt_seconds:g} s)")
      job.info["split"] = "head as prompt"
      job.info["prompt_seconds"] = prompt_seconds
      job.info["source_seconds"] = round(total, 3)
      job.reference_wav24 = wav24  # cut to the rendered span once the frames are known
    job.chunks = [Chunk(tokens=0)]  # set once the clip is tokenized
    return job


def _no_phones(job: Job, ctx: Context) -> None:
  """A phone model (Omni) serves a condition task with an empty phone prefix."""
  if ctx.uses_phones:
    job.prompt_phones = np.zeros((0,), np.int32)
    for c in job.chunks:
      c.phones = np.zeros((0,), np.int32)


class ConditionTask(Task):
  """se / tse / vc: the fine-tuned model conditioned on features of the input audio.

  Fields: `wav` (the input: noisy / mixture / source; also accepted under
  `noisy_wav`, `mixture_wav`, `source_wav`), `prompt_wav` (tse: enrollment,
  vc: target speaker), optional `reference_wav` (the clean / expected speech:
  signal measures for se / tse, NLL for all), `reference_aligned` (true / false:
  whether the reference has the input's timing, so signal measures apply; default
  se / tse true, vc false) and `text` (WER hook).
  """
  prompted = True
  needs_adapter = True
  aligned_reference = True   # the reference is time-aligned with the input (SI-SNR, mel, STOI)
  input_fields = ("wav", "noisy_wav", "mixture_wav", "source_wav")

  def prepare(self, example: Example, ctx: Context) -> Job:
    s = ctx.settings
    field = next((f for f in self.input_fields if example.fields.get(f)), "wav")
    waves = load_audio(example.fields.get(field), field)
    wav16 = waves[16000]
    if _num_ssl(len(wav16)) < 1:
      raise ExampleError(f"{field}: {example.fields.get(field)}: too short ({len(wav16) / 16000:.3f} s)")
    job = Job(example, self.name, [], text=_text_field(example, "text", required=False),
              independent_chunks=True)
    job.input_wav24 = waves[24000]
    job.info["input_seconds"] = round(len(wav16) / 16000, 3)
    if self.prompted:
      self._prompt(job, example, ctx)
      prompt16 = job.prompt_wav16
    else:
      if example.fields.get("prompt_wav"):
        raise ExampleError(f"'prompt_wav' given, but {self.name} takes no prompt")
      job.prompt_semantic = np.zeros((0,), np.int32)
      job.prompt_acoustic = np.zeros((0, 0), np.int32)
      prompt16 = np.zeros((0,), np.float32)
    try:
      spans = windows_lib.plan(len(wav16), s.window_seconds, s.window_overlap_seconds)
    except ValueError as e:
      raise ExampleError(str(e)) from e
    for w in spans:
      piece = wav16[w.start:w.start + w.length]
      job.chunks.append(Chunk(tokens=_num_ssl(len(piece)),  # exact once the features are known
                              condition_wav16=np.concatenate([prompt16, piece]).astype(np.float32),
                              offset=w.start_token * OUTPUT_HOP))
    if len(spans) > 1:
      job.info["windows"] = len(spans)
    if example.fields.get("reference_wav"):
      refs = load_audio(example.fields["reference_wav"], "reference_wav")
      job.reference_wav16 = refs[16000]
      job.input_wav16 = wav16
      aligned = example.fields.get("reference_aligned", self.aligned_reference)
      if not isinstance(aligned, bool):
        raise ExampleError(f"'reference_aligned' must be true or false, got {aligned!r}")
      if aligned:
        job.reference_wav24 = refs[24000]
    _no_phones(job, ctx)
    return job


@register_task
class SETask(ConditionTask):
  """Speech enhancement: noisy `wav` -> clean speech of the same length (no prompt)."""
  name = "se"
  prompted = False


@register_task
class TSETask(ConditionTask):
  """Target speaker extraction: mixture `wav` + enrollment `prompt_wav` -> that speaker's speech."""
  name = "tse"


@register_task
class VCTask(ConditionTask):
  """Voice conversion: source `wav` + target speaker `prompt_wav` -> the source's words in that voice."""
  name = "vc"
  aligned_reference = False  # a reference in the target voice has other timing: NLL / hooks only


def read_visual_features(path: Optional[str], dim: int, field: str = "visual_features") -> np.ndarray:
  """`[frames, dim]` float32 from a .npy file; ExampleError naming the file otherwise."""
  if not path:
    raise ExampleError(f"missing '{field}' (a .npy file of [frames, {dim}] features at 25 fps)")
  if not os.path.exists(path):
    raise ExampleError(f"{field}: {path}: no such file")
  try:
    feats = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ExampleError(f"{field}: {path}: not a .npy array ({e})") from e
  if feats.ndim != 2 or feats.shape[1] != dim or feats.shape[0] < 1:
    raise ExampleError(f"{field}: {path}: expected [frames, {dim}] features at 25 fps, got shape "
                       f"{list(feats.shape)}")
  if not np.all(np.isfinite(feats)):
    raise ExampleError(f"{field}: {path}: has NaN or infinite values")
  return feats.astype(np.float32)


def condition_frames(prompt_tokens: int, target_features: np.ndarray) -> np.ndarray:
  """`[prompt_tokens + T, dim]`: zero frames on the prompt, then the target's (l2s)."""
  return np.asarray(visual_features.pad_prompt_frames(target_features, prompt_tokens), np.float32)


def l2s_condition(video_feat: np.ndarray, prompt_tokens: int) -> np.ndarray:
  """`[T25, 768]` 25 fps features -> `[prompt_tokens + 2 T25, 768]` decoder condition."""
  return condition_frames(prompt_tokens, np.asarray(visual_features.upsample_x2(video_feat)))


@register_task
class L2STask(Task):
  """Lip to speech: `visual_features` (.npy, 25 fps) -> speech, 2 tokens per video frame;
  optional `prompt_wav` (the voice), optional `reference_wav` (NLL) and `text` (WER)."""
  name = "l2s"
  needs_adapter = True

  def prepare(self, example: Example, ctx: Context) -> Job:
    feats = read_visual_features(example.fields.get("visual_features"), ctx.settings.visual_feature_dim)
    job = Job(example, self.name, [], text=_text_field(example, "text", required=False))
    if example.fields.get("prompt_wav"):
      self._prompt(job, example, ctx)
    else:
      job.prompt_semantic = np.zeros((0,), np.int32)
      job.prompt_acoustic = np.zeros((0, 0), np.int32)
    target = np.asarray(visual_features.upsample_x2(feats), np.float32)
    job.chunks = [Chunk(tokens=len(target), target_features=target)]
    job.info["video_frames"] = int(feats.shape[0])
    self._reference(job, example)
    _no_phones(job, ctx)
    return job


@register_task
class OmniTask(Task):
  """The Omni model: one fine-tune serving tts, se, tse or vc (`--omni_task`); TTS runs without
  adapter features, the others as their own tasks."""
  name = "omni"

  def __init__(self):
    self.sub: Task = TTSTask()

  def configure(self, settings: TaskSettings) -> None:
    if settings.omni_task not in OMNI_TASKS:
      raise ValueError(f"--omni_task {settings.omni_task!r}: expected one of {', '.join(OMNI_TASKS)}")
    self.sub = TASKS[settings.omni_task]()

  @property
  def defaults_name(self) -> str:
    return self.sub.name

  @property
  def needs_text(self) -> bool:  # pylint: disable=invalid-overridden-method
    return self.sub.needs_text

  @property
  def needs_adapter(self) -> bool:  # pylint: disable=invalid-overridden-method
    return True

  def prepare(self, example: Example, ctx: Context) -> Job:
    job = self.sub.prepare(example, ctx)
    job.info["omni_task"] = self.sub.name
    return job


def _num_ssl(samples: int) -> int:
  from metis_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return int(tokenizer_lib.num_ssl_frames(samples))
