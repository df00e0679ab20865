r"""Generation and evaluation from the command line.

One example:
  python -m metis_jax.decode --task tts \
      --model /ckpt/maskgct_t2s --s2a_full s2a_full.safetensors --s2a_1layer s2a_1layer.safetensors \
      --codec /ckpt/acoustic_codec --tokenizer /ckpt/ssl_tokenizer --vocab vocab.json \
      --prompt_wav prompt.wav --prompt_text "Transcript of the prompt." \
      --text "What to say." --out out.wav

From the default job's workdir alone (its decode_bundle.json names both S2A models, the SSL
tokenizer and the acoustic tokenizer rendered by Griffin-Lim, inference/mel_renderer.py):
  python -m metis_jax.decode --task continue --model /tmp/metis_tiny --prompt_wav p.wav \
      --target_seconds 3 --out continued.wav
A tiny fine-tune of that job's base, with the job's other parts (--bundle fills what is missing):
  python -m metis_jax.decode --task se --model /tmp/ft_se/export/model --bundle /tmp/metis_tiny \
      --wav noisy.wav --out enhanced.wav

From the released weights as downloaded (python -m metis_jax.fetch --released_dir /ckpt/released):
  python -m metis_jax.decode --task tts --released_dir /ckpt/released \
      --prompt_wav prompt.wav --prompt_text "..." --text "What to say." --out out.wav
Parts given by their own flags win over the workdir's and the folder's (inference/decode_parts.py).
Before loading, each model's lineage.json (what it was trained on) is checked against the SSL
tokenizer and the codec / acoustic tokenizer given: parts that do not belong together are refused
with one line naming the part.

Many examples, one JSON object per line (paths relative to the manifest):
  python -m metis_jax.decode --task tts --manifest test.jsonl --output_dir out/ [model flags]
  {"id": "a1", "prompt_wav": "p.wav", "prompt_text": "...", "text": "...", "language": "en",
   "target_seconds": 4.0, "reference_wav": "gt.wav"}
  (resynth: {"wav": "clip.wav"}; continue: {"prompt_wav": ..., "target_seconds": ...};
   se: {"wav": "noisy.wav", "reference_wav": "clean.wav"}; tse: {"wav": "mixture.wav",
   "prompt_wav": "enrollment.wav"}; vc: {"wav": "source.wav", "prompt_wav": "voice.wav"}, with
   "reference_aligned": true when its "reference_wav" has the source's timing (signal measures);
   l2s: {"visual_features": "lips.npy", "prompt_wav": "voice.wav"})

Fine-tuned tasks (se, tse, vc, l2s, omni), e.g.:
  python -m metis_jax.decode --task tse --model metis_base/model.safetensors \
      --lora metis_tse/metis_tse_lora_32.safetensors \
      --adapter metis_tse/metis_tse_lora_32_adapter.safetensors [S2A, codec, tokenizer flags] \
      --wav mixture.wav --prompt_wav enrollment.wav --out target.wav
  (L2S / Omni: --model the full checkpoint; Omni: --task omni --omni_task se|tse|vc|tts.)
The condition is the model's `cond_feature` (default w2v-BERT 2.0 layer 17, computed by the
w2v-BERT tokenizer's encoder) of the input (se) or of concat(prompt, input) as one waveform
(tse, vc). Inputs longer than --window_seconds (20) run in windows overlapping by
--window_overlap_seconds (1), each one ordinary call, joined by a linear crossfade of their
waveforms (inference/windows.py). Defaults: se / tse 10 steps cfg 0, vc 20 steps cfg 1,
l2s 25 steps cfg 2.5 (spec §6), all overridable.

Writes one 24 kHz wav per example (`<output_dir>/<id>.wav`, or the line's
"out"), a JSON-lines report (one object per example: status, error, duration,
RTF, metrics), `report.html` beside it (players and spectrograms of input,
prompt, output and reference, measures, summary table; offline) and a
summary table; a failed example (missing or corrupt
file, empty text, unknown language, prompt too long) is reported and the
others still complete. Exit status: 0 all done, 1 some failed, 2 nothing ran.

Tasks (`--task`): continue, tts, resynth (see decode_tasks; the registry is
open). Decoding options default to the task's reference settings (spec §6;
`--recipe maskgct` for MaskGCT's S2A schedule); `--seed` fixes the output:
each example draws from its own key (seed, id), so batching does not change it.

Duration: `--target_seconds` (or per example), else the prompt's speaking
rate: `--length_rule phone_rate` (MaskGCT, default) or `byte_rate` (Metis);
see target_length. Text longer than `--chunk_seconds` is split at sentences
and generated chunk by chunk, each chunk prompted with the previous one
(`--chunk_prompt original` reuses the example's prompt), and joined.

Batching: examples are grouped by length into a few padded shapes (one
compilation each) and run `--batch_size` at a time (the global batch,
rounded up to a multiple of the devices); a progress line reports
examples/s and the real-time factor.

Devices and processes: each batch is laid out over a mesh of all devices
(`--mesh_data/--mesh_fsdp/--mesh_tensor`, default pure data parallel with
replicated parameters; `--devices_per_process` to use fewer). A multi-process
job (`--coordinator_address/--num_processes/--process_id` as for training, or
the METIS_* variables of launch/local_multiprocess.py) runs the same command
in every process: process p owns the examples whose manifest index i has
i % P == p, fills its rows of every global batch with them and writes their
wavs; the report and summary, merged in manifest order, are written by
process 0, which also prints the progress. Outputs do not depend on the
number of devices or processes.
"""

import dataclasses
import json
import os
import sys
import time
import zlib
from typing import Optional, Sequence

from absl import flags
import numpy as np

from metis_jax.parallel import compilation_cache

# The flags are declared on a FlagValues of their own, so that `run_cli` can be
# called from Python (tests, notebooks) next to other modules' flags.
_BOOL, _STR, _INT, _FLOAT, _LIST, _ENUM = "bool", "str", "int", "float", "list", "enum"
FLAG_SPECS = (
    # Task and models.
    ("task", _STR, "tts", "Task: continue, tts, resynth, se, tse, vc, l2s, omni (inference.tasks.TASKS)."),
    ("omni_task", _ENUM, "tts", "What an Omni model (--task omni) does.", ["tts", "se", "tse", "vc"]),
    ("model", _STR, None, "Stage-1 model (T2S / Metis): an Amphion .safetensors, a folder from "
     "metis_jax.convert, or a training workdir (the default job's brings every other part: its "
     "decode_bundle.json). Optional for resynth (then used for NLL). Fine-tunes: "
     "the Metis base file with --lora and --adapter (merged once at load), or one full checkpoint "
     "(L2S, Omni)."),
    ("lora", _STR, None, "Released LoRA file of a fine-tune (metis_*_lora_32.safetensors), merged into "
     "--model at load."),
    ("adapter", _STR, None, "Released adapter file of a fine-tune (metis_*_lora_32_adapter.safetensors)."),
    ("lora_alpha", _FLOAT, None, "LoRA alpha when the file does not say it (released: 2 x rank)."),
    ("s2a_full", _STR, None, "S2A model rendering the codec layers (safetensors or converted folder)."),
    ("s2a_1layer", _STR, None, "S2A model for codec layer 0 (needed when --s2a_full does not predict it)."),
    ("codec", _STR, None, "Folder with the acoustic codec files (encoder.safetensors + "
     "decoder.safetensors, or model.safetensors + model_1.safetensors)."),
    ("codec_encoder", _STR, None, "Acoustic codec encoder file (instead of --codec)."),
    ("codec_decoder", _STR, None, "Acoustic codec decoder file (instead of --codec)."),
    ("tokenizer", _STR, None, "SSL tokenizer folder (tokenizer.json: k-means or w2v-BERT + semantic codec)."),
    ("vocab", _STR, None, "Phone vocabulary (vocab.json shipped with the TTS model)."),
    ("released_dir", _STR, None, "Folder of the released weights as downloaded (python -m metis_jax.fetch; "
     "conversion/released.py): every part not given by its own flag comes from it, the SSL tokenizer "
     "from w2v-bert-2.0/ + its statistics (.npz) + semantic_codec/ unless --tokenizer."),
    ("bundle", _STR, None, "A default job's workdir (its decode_bundle.json) supplying every part not "
     "given otherwise: both S2A models, the SSL tokenizer and the Griffin-Lim mel renderer (and the "
     "stage-1 model without --model); e.g. --model <a tiny fine-tune>/export/model --bundle /tmp/metis_tiny."),
    ("dtype", _STR, "", "Compute dtype of the models ('' = float32 on CPU, else the models' own)."),
    # Examples.
    ("text", _STR, None, "Text to say (one example)."),
    ("prompt_wav", _STR, None, "Prompt audio, any rate / channels (one example)."),
    ("prompt_text", _STR, None, "Transcript of the prompt (tts)."),
    ("wav", _STR, None, "Input audio: the clip to re-render (resynth), the noisy speech (se), the "
     "mixture (tse), the source speech (vc)."),
    ("visual_features", _STR, None, "l2s: .npy of [frames, 768] visual features at 25 fps."),
    ("reference_wav", _STR, None, "Ground-truth speech of the target, for NLL (optional)."),
    ("out", _STR, None, "Output wav (one example)."),
    ("manifest", _STR, None, "JSON lines, one example each (instead of the single-example flags)."),
    ("output_dir", _STR, None, "Where outputs of --manifest go."),
    ("report", _STR, "", "Report path ('' = <output_dir>/report.jsonl, or <out>_report.jsonl)."),
    ("language", _STR, "en", "Language of the text: en, fr, de, ko."),
    ("prompt_language", _STR, "", "Language of the prompt text ('' = --language)."),
    # Duration and chunking.
    ("target_seconds", _FLOAT, 0.0, "Seconds to generate (0 = estimate from the prompt)."),
    ("length_rule", _ENUM, "phone_rate", "Duration estimate: phone_rate (MaskGCT) or byte_rate (Metis).",
     ["phone_rate", "byte_rate"]),
    ("chunk_seconds", _FLOAT, 15.0, "Longest piece generated in one go (long text is split at sentences)."),
    ("chunk_prompt", _ENUM, "previous", "Prompt of chunks after the first: the previous chunk or the "
     "example's prompt.", ["previous", "original"]),
    ("max_prompt_seconds", _FLOAT, 20.0, "Longer prompts are refused (the models saw 3-30 s clips)."),
    ("prompt_seconds", _FLOAT, 3.0, "resynth: seconds at the start of the clip used as prompt."),
    ("window_seconds", _FLOAT, 20.0, "se/tse/vc: inputs longer than this run in overlapping windows, "
     "crossfaded in the waveform (0 = one call whatever the length)."),
    ("window_overlap_seconds", _FLOAT, 1.0, "se/tse/vc: overlap of neighbouring windows."),
    # Decoding.
    ("recipe", _ENUM, "metis", "Reference defaults: metis, or maskgct (S2A [25,10,1x10], CFG 2.5 for both).",
     ["metis", "maskgct"]),
    ("steps", _INT, None, "Stage-1 decoding steps (default: the task's)."),
    ("cfg", _FLOAT, None, "Stage-1 classifier-free guidance scale."),
    ("rescale_cfg", _FLOAT, None, "Stage-1 CFG rescale mix."),
    ("temperature", _FLOAT, None, "Stage-1 sampling temperature."),
    ("s2a_steps", _LIST, None, "Steps per codec layer of the full S2A model (e.g. 40,16,1,...; "
     "padded with 1s to its layers)."),
    ("s2a_cfg", _FLOAT, None, "CFG scale of the full S2A model."),
    ("s2a_1layer_steps", _INT, None, "Steps of the 1-layer S2A model."),
    ("s2a_1layer_cfg", _FLOAT, None, "CFG scale of the 1-layer S2A model."),
    ("s2a_rescale_cfg", _FLOAT, None, "S2A CFG rescale mix."),
    ("s2a_temperature", _FLOAT, None, "S2A sampling temperature."),
    ("seed", _INT, 0, "Seed; each manifest example draws from fold_in(seed, crc32(id)), a single "
     "example from its own fixed stream."),
    ("batch_size", _INT, 8, "Examples per batch, over all devices and processes (rounded up to a "
     "multiple of the devices the batch is split over)."),
    ("token_quantum", _INT, 50, "Padding multiple of token lengths (50 = 1 s; audio is padded alike): "
     "larger = fewer compilations, more wasted compute."),
    ("phone_quantum", _INT, 32, "Padding multiple of phone sequences."),
    ("prompt_context", _BOOL, True, "Decode the prompt's codes with the output (no click at the start)."),
    # Devices and processes.
    ("mesh_data", _INT, -1, "Data-parallel ways of the decode mesh (-1 = the devices left)."),
    ("mesh_fsdp", _INT, 1, "FSDP ways (the batch and the parameters' `embed` axis are split)."),
    ("mesh_tensor", _INT, 1, "Tensor-parallel ways (heads / MLP / vocabulary split; inside a process)."),
    ("devices_per_process", _INT, 0, "Devices used in each process (0 = all)."),
    ("coordinator_address", _STR, None, "host:port of process 0 for multi-process jobs."),
    ("num_processes", _INT, None, "Number of processes in the job."),
    ("process_id", _INT, None, "This process's index in [0, num_processes)."),
    ("compilation_cache_dir", _STR, None, compilation_cache.FLAG_HELP),
    # Evaluation.
    ("evaluate", _BOOL, True, "Compute metrics where references exist (NLL, SI-SNR, mel distance)."),
    ("html_report", _BOOL, True, "Also write report.html beside the report: players, spectrograms, "
     "measures (its audio and images in <report>_files/)."),
    ("asr_hook", _STR, None, "ASR for WER: 'module:factory', factory(weights)(wav, rate, lang) -> text."),
    ("asr_weights", _STR, None, "Weights the ASR factory loads."),
    ("speaker_hook", _STR, None, "Speaker embedding: 'module:factory', factory(weights)(wav, rate) -> vector."),
    ("speaker_weights", _STR, None, "Weights the speaker-embedding factory loads."),
)


def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
  for spec in FLAG_SPECS:
    name, kind, default, help_text = spec[:4]
    kw = dict(flag_values=flag_values)
    if kind == _BOOL:
      flags.DEFINE_bool(name, default, help_text, **kw)
    elif kind == _STR:
      flags.DEFINE_string(name, default, help_text, **kw)
    elif kind == _INT:
      flags.DEFINE_integer(name, default, help_text, **kw)
    elif kind == _FLOAT:
      flags.DEFINE_float(name, default, help_text, **kw)
    elif kind == _LIST:
      flags.DEFINE_list(name, default, help_text, **kw)
    elif kind == _ENUM:
      flags.DEFINE_enum(name, default, spec[4], help_text, **kw)
  return flag_values


@dataclasses.dataclass
class Args:
  """The parsed command line (one field per flag)."""
  values: dict

  def __getattr__(self, name):
    try:
      return self.__dict__["values"][name]
    except KeyError as e:
      raise AttributeError(name) from e

  @classmethod
  def from_flags(cls, fv: flags.FlagValues) -> "Args":
    return cls({spec[0]: fv[spec[0]].value for spec in FLAG_SPECS})

  @classmethod
  def create(cls, **overrides) -> "Args":
    values = {spec[0]: spec[2] for spec in FLAG_SPECS}
    unknown = set(overrides) - set(values)
    if unknown:
      raise ValueError(f"unknown options: {sorted(unknown)}")
    values.update(overrides)
    return cls(values)


class UsageError(ValueError):
  """A run that cannot start (bad flags, missing or unreadable model files)."""


# ----------------------------------------------------------------------------- examples

EXAMPLE_FIELDS = ("id", "text", "prompt_wav", "prompt_text", "wav", "source_wav", "noisy_wav",
                  "mixture_wav", "reference_wav", "visual_features", "language", "prompt_language",
                  "target_seconds", "prompt_seconds", "out")
PATH_FIELDS = ("prompt_wav", "wav", "source_wav", "noisy_wav", "mixture_wav", "reference_wav",
               "visual_features")


def read_examples(args: Args):
  """-> (examples, [(example, error)] for lines that are not examples)."""
  from metis_jax.inference import tasks as decode_tasks  # pylint: disable=g-import-not-at-top
  if args.manifest:
    if not args.output_dir:
      raise UsageError("--manifest needs --output_dir")
    if not os.path.isfile(args.manifest):
      raise UsageError(f"{args.manifest}: manifest not found")
    base = os.path.dirname(os.path.abspath(args.manifest))
    entries = []
    with open(args.manifest, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          entries.append((n, line))
    examples, bad, seen = [], [], set()
    for index, (n, line) in enumerate(entries):
      try:
        fields = json.loads(line)
        if not isinstance(fields, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        ex = decode_tasks.Example(index, f"line{n}", {}, "")
        bad.append((ex, f"{args.manifest}:{n}: not a JSON object ({e})"))
        continue
      ex_id = str(fields.get("id") or f"{index:05d}")
      out = fields.get("out") or f"{ex_id}.wav"
      out = out if os.path.isabs(out) else os.path.join(args.output_dir, out)
      for key in PATH_FIELDS:
        if fields.get(key) and not os.path.isabs(fields[key]):
          fields[key] = os.path.join(base, fields[key])
      ex = decode_tasks.Example(index, ex_id, fields, out)
      if ex_id in seen:
        bad.append((ex, f"{args.manifest}:{n}: duplicate id {ex_id!r}"))
        continue
      seen.add(ex_id)
      examples.append(ex)
    return examples, bad
  if not args.out:
    raise UsageError("give --out (one example) or --manifest and --output_dir")
  fields = {k: args.values.get(k) for k in ("text", "prompt_wav", "prompt_text", "wav", "reference_wav",
                                            "visual_features")}
  fields = {k: v for k, v in fields.items() if v is not None}
  ex_id = os.path.splitext(os.path.basename(args.out))[0]
  # One example: its random stream does not depend on the output's name.
  return [decode_tasks.Example(0, ex_id, fields, args.out, seed_id="example")], []


def report_path(args: Args) -> str:
  if args.report:
    return args.report
  if args.manifest:
    return os.path.join(args.output_dir, "report.jsonl")
  return os.path.splitext(args.out)[0] + "_report.jsonl"


# ----------------------------------------------------------------------------- set-up


def decode_defaults(args: Args, task_name: str):
  from metis_jax.inference import tasks as decode_tasks  # pylint: disable=g-import-not-at-top
  defaults = decode_tasks.DECODE_DEFAULTS.get(task_name, decode_tasks.DecodeDefaults())
  if args.recipe == "maskgct":
    defaults = dataclasses.replace(
        defaults, s2a_steps=decode_tasks.MASKGCT_TTS.s2a_steps,
        s2a_first_steps=decode_tasks.MASKGCT_TTS.s2a_first_steps,
        s2a_first_cfg=decode_tasks.MASKGCT_TTS.s2a_first_cfg)
  pick = lambda flag, default: default if flag is None else flag
  try:
    s2a_steps = tuple(int(s) for s in args.s2a_steps) if args.s2a_steps else defaults.s2a_steps
  except ValueError as e:
    raise UsageError(f"--s2a_steps must be integers, got {args.s2a_steps}") from e
  if min(s2a_steps, default=0) < 1:
    raise UsageError(f"--s2a_steps must be positive, got {list(s2a_steps)}")
  return dataclasses.replace(
      defaults, steps=pick(args.steps, defaults.steps), cfg=pick(args.cfg, defaults.cfg),
      rescale_cfg=pick(args.rescale_cfg, defaults.rescale_cfg),
      temperature=pick(args.temperature, defaults.temperature), s2a_steps=s2a_steps,
      s2a_cfg=pick(args.s2a_cfg, defaults.s2a_cfg),
      s2a_first_steps=pick(args.s2a_1layer_steps, defaults.s2a_first_steps),
      s2a_first_cfg=pick(args.s2a_1layer_cfg, defaults.s2a_first_cfg),
      s2a_rescale_cfg=pick(args.s2a_rescale_cfg, defaults.s2a_rescale_cfg),
      s2a_temperature=pick(args.s2a_temperature, defaults.s2a_temperature))


def resolve_parts(args: Args, task):
  """`decode_parts.resolve`, then what is still missing from `--bundle`; failures as UsageError."""
  from metis_jax.inference import decode_parts, demo_bundle  # pylint: disable=g-import-not-at-top
  if args.bundle and not demo_bundle.is_bundle(args.bundle):
    raise UsageError(f"--bundle {args.bundle}: no {demo_bundle.BUNDLE_NAME} there; give the default job's "
                     "workdir (python -m metis_jax.train --config configs/tiny.py --workdir DIR)")
  try:
    parts = decode_parts.resolve(args, task)
    if args.bundle:
      bundle_args = Args(dict(args.values, model=args.bundle, lora=None, adapter=None, released_dir=None))
      _fill_parts(parts, decode_parts.resolve(bundle_args, task), decode_parts.BUNDLE)
  except decode_parts.PartsError as e:
    raise UsageError(str(e)) from e
  return parts


def _fill_parts(parts, other, origin: str) -> None:
  """Copies into `parts` each part it lacks from `other` (the acoustic side and the tokenizer whole)."""
  for name in ("stage1", "s2a_full", "s2a_1layer", "vocab"):
    if not getattr(parts, name) and getattr(other, name):
      setattr(parts, name, getattr(other, name))
      parts.origin[name] = origin
  if not parts.has_tokenizer and other.has_tokenizer:
    parts.tokenizer, parts.tokenizer_files = other.tokenizer, other.tokenizer_files
    parts.origin["tokenizer"] = origin
  if not parts.has_acoustic and other.has_acoustic:
    for name in ("renderer", "codec_encoder", "codec_decoder"):
      setattr(parts, name, getattr(other, name))
      if getattr(other, name):
        parts.origin[name] = origin
    parts.renderer_options = dict(other.renderer_options)


def build_engine(args: Args, task, parts=None):
  """Loads the models named by the flags (or found in the default job's workdir or the released
  folder: `parts`, default `resolve_parts`), after checking they belong together -> SpeechEngine."""
  import jax  # pylint: disable=g-import-not-at-top
  from metis_jax.data import fingerprint  # pylint: disable=g-import-not-at-top
  from metis_jax.inference import decode_parts, engine as decode_engine, decoding, s2a_decoding  # pylint: disable=g-import-not-at-top
  d = decode_defaults(args, task.defaults_name)
  layout = make_layout(args)
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else None)
  parts = parts if parts is not None else resolve_parts(args, task)
  missing = decode_parts.missing(parts, task)
  if missing:
    raise UsageError(f"task {task.name!r} needs {', '.join(missing)}")
  try:
    decode_parts.check(parts)
  except fingerprint.IncompatiblePartsError as e:
    raise UsageError(_one_line(e)) from e
  except OSError as e:
    raise UsageError(str(e)) from e
  try:
    tokenizer, codec, full, first, stage1 = load_parts(parts, dtype, args.lora_alpha)
  except (OSError, ValueError) as e:
    raise UsageError(_one_line(e)) from e
  if not full.config.predicts_first_layer and first is None:
    raise UsageError(f"{parts.s2a_full}: this S2A model does not predict codec layer 0: give the "
                     "1-layer model with --s2a_1layer")
  options = decode_engine.EngineOptions(
      stage1=decoding.DecodeOptions(steps=d.steps, cfg=d.cfg, rescale_cfg=d.rescale_cfg,
                                    temperature=d.temperature),
      s2a_full=s2a_decoding.S2ADecodeOptions(steps=tuple(d.s2a_steps), cfg=d.s2a_cfg,
                                             rescale_cfg=d.s2a_rescale_cfg,
                                             temperature=d.s2a_temperature),
      s2a_first=s2a_decoding.S2ADecodeOptions(steps=(d.s2a_first_steps,), cfg=d.s2a_first_cfg,
                                              rescale_cfg=d.s2a_rescale_cfg,
                                              temperature=d.s2a_temperature),
      batch_size=args.batch_size, token_quantum=args.token_quantum, phone_quantum=args.phone_quantum,
      audio_quantum_seconds=args.token_quantum / 50.0, prompt_context=args.prompt_context)
  try:
    engine = decode_engine.SpeechEngine(tokenizer, codec, full, first, stage1, options, layout)
  except ValueError as e:
    raise UsageError(str(e)) from e
  engine.parts = parts
  return engine


def _one_line(e: Exception) -> str:
  """An exception's message without a leading 'error: ' (run_cli adds it)."""
  message = str(e)
  return message[len("error: "):] if message.startswith("error: ") else message


def load_parts(parts, dtype, lora_alpha=None):
  """-> (tokenizer, codec or mel renderer, full S2A, 1-layer S2A or None, stage 1 or None)."""
  from metis_jax.inference import mel_renderer, model_loading  # pylint: disable=g-import-not-at-top
  if parts.tokenizer:
    tokenizer = model_loading.load_tokenizer(parts.tokenizer)
  else:
    from metis_jax.frontend import ssl_tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = ssl_tokenizer.W2VBertCodecTokenizer.from_files(*parts.tokenizer_files)
  if parts.renderer:
    codec = mel_renderer.MelRenderer.load(parts.renderer, **parts.renderer_options)
  else:
    codec = model_loading.load_codec(parts.codec_encoder, parts.codec_decoder, dtype)
  full = model_loading.load_s2a(parts.s2a_full, dtype)
  first = model_loading.load_s2a(parts.s2a_1layer, dtype) if parts.s2a_1layer else None
  stage1 = (model_loading.load_stage1(parts.stage1, dtype, lora=parts.lora, adapter=parts.adapter,
                                      lora_alpha=lora_alpha) if parts.stage1 else None)
  return tokenizer, codec, full, first, stage1


def make_layout(args: Args):
  """The decode mesh of the flags -> batch_layout.BatchLayout."""
  from metis_jax.parallel import batch_layout  # pylint: disable=g-import-not-at-top
  try:
    devices = batch_layout.select_devices(args.devices_per_process)
    mesh = batch_layout.make_mesh(args.mesh_data, args.mesh_fsdp, args.mesh_tensor, devices)
    return batch_layout.BatchLayout(mesh)
  except ValueError as e:
    raise UsageError(f"decode mesh: {e}") from e


# The last engine built, reused by the next run with the same files and options
# (its jitted functions keep their compilations: repeated runs in one process,
# e.g. from a notebook or tests, do not compile again).
_ENGINE_CACHE: dict = {}


def _file_stamp(path: Optional[str]):
  if not path:
    return None
  path = os.path.abspath(path)
  if os.path.isdir(path):
    stamps = []
    for root, _, files in os.walk(path):
      stamps += [(os.path.join(root, f), os.path.getmtime(os.path.join(root, f))) for f in files]
    return path, tuple(sorted(stamps))
  return path, os.path.getmtime(path) if os.path.exists(path) else None


def cached_engine(args: Args, task):
  """`build_engine`, reusing the previous engine when files and options are unchanged."""
  d = decode_defaults(args, task.defaults_name)
  parts = resolve_parts(args, task)
  files = (parts.stage1, parts.lora, parts.adapter, parts.s2a_full, parts.s2a_1layer, parts.codec_encoder,
           parts.codec_decoder, parts.tokenizer, parts.renderer) + tuple(parts.tokenizer_files or ())
  key = (tuple(_file_stamp(f) for f in files), args.lora_alpha, d, args.dtype,
         args.batch_size,
         args.token_quantum, args.phone_quantum, args.prompt_context, args.mesh_data, args.mesh_fsdp,
         args.mesh_tensor, args.devices_per_process)
  if key not in _ENGINE_CACHE:
    _ENGINE_CACHE.clear()
    _ENGINE_CACHE[key] = build_engine(args, task, parts)
  return _ENGINE_CACHE[key], d


# ----------------------------------------------------------------------------- progress


class Progress:
  """Prints one line per batch: stage, examples done, examples/s and RTF so far.

  Counts are this process's plus the other processes' as of the last `sync`
  (a collective); only the process with `stream` set prints.
  """

  def __init__(self, total: int, stream=None):
    self.total, self.stream = total, stream
    self.start = time.perf_counter()
    self.done = self.failed = 0
    self.seconds = 0.0
    self.others = np.zeros(3)  # done, failed, seconds of the other processes

  def finished(self, seconds: float) -> None:
    self.done += 1
    self.seconds += seconds

  def failure(self) -> None:
    self.failed += 1

  def sync(self, layout) -> None:
    """Learns the other processes' counts (every process must call it)."""
    if layout.multiprocess:
      own = np.asarray([self.done, self.failed, self.seconds], np.float32)
      self.others = layout.allgather(own).astype(np.float64).sum(0) - own

  def line(self, stage: str, n: int, wall: float) -> None:
    if self.stream is None:
      return
    elapsed = time.perf_counter() - self.start
    done, failed, seconds = np.asarray([self.done, self.failed, self.seconds]) + self.others
    rate = done / elapsed if elapsed > 0 else 0.0
    rtf = f"{elapsed / seconds:.3f}" if seconds else "-"
    failed = f" ({failed:.0f} failed)" if failed else ""
    print(f"[decode] {stage}: {n} in {wall:.2f} s | {done:.0f}/{self.total} done{failed}, "
          f"{rate:.2f} examples/s, RTF {rtf}, {elapsed:.1f} s", file=self.stream, flush=True)


# ----------------------------------------------------------------------------- the run


def _keys(seed: int, example_id: str):
  import jax  # pylint: disable=g-import-not-at-top
  base = jax.random.fold_in(jax.random.key(seed), zlib.crc32(example_id.encode("utf-8")) & 0x7FFFFFFF)
  return lambda stream, r=0: jax.random.fold_in(jax.random.fold_in(base, stream), r)


STAGE1_STREAM, RENDER_STREAM, NLL_STREAM = 1, 2, 3


def run(args: Args, stream=None) -> dict:
  """Runs a whole job; returns the summary (see evaluation.Report.summary).

  Raises:
    UsageError: the run cannot start (flags, model files).
  """
  return _Run(args, stream or sys.stderr).run()


def owner(index: int, process_count: int) -> int:
  """The process that decodes the example at manifest position `index` (round robin)."""
  return index % process_count


class _Run:
  """One invocation: examples -> jobs -> tokens -> generation rounds -> wavs and report.

  With several processes each runs this on its own share of the examples;
  every engine call and `Progress.sync` is collective, so all processes make
  them in the same order, with or without examples of their own.
  """

  def __init__(self, args: Args, stream):
    from metis_jax.inference import tasks as decode_tasks, evaluation  # pylint: disable=g-import-not-at-top
    from metis_jax.frontend import g2p as g2p_lib
    self.args, self.stream = args, stream
    self.t_start = time.perf_counter()
    settings = decode_tasks.TaskSettings(
        language=args.language, prompt_language=args.prompt_language,
        target_seconds=args.target_seconds, length_rule=args.length_rule,
        chunk_seconds=args.chunk_seconds, max_prompt_seconds=args.max_prompt_seconds,
        prompt_seconds=args.prompt_seconds, window_seconds=args.window_seconds,
        window_overlap_seconds=args.window_overlap_seconds, omni_task=args.omni_task)
    try:
      self.task = decode_tasks.get_task(args.task)
      self.task.configure(settings)
    except ValueError as e:
      raise UsageError(str(e)) from e
    examples, bad = read_examples(args)
    if not examples and not bad:
      raise UsageError(f"{args.manifest}: no examples")
    self.engine, self.defaults = cached_engine(args, self.task)
    self.layout = self.engine.layout
    rank, count = self.layout.process_rank, self.layout.process_count
    self.primary = rank == 0
    self.examples = [ex for ex in examples if owner(ex.index, count) == rank]
    self.bad = [(ex, m) for ex, m in bad if owner(ex.index, count) == rank]
    self.total = len(examples) + len(bad)
    self.asr = evaluation.load_hook(args.asr_hook, args.asr_weights) if args.asr_hook else None
    self.speaker = (evaluation.load_hook(args.speaker_hook, args.speaker_weights)
                    if args.speaker_hook else None)
    uses_phones = self.engine.uses_phones
    feature_dim = self.engine.feature_dim
    if self.task.needs_adapter and not feature_dim:
      raise UsageError(f"{args.model}: task {self.task.name!r} needs a fine-tuned model with a "
                       "condition adapter (the Metis base file with --lora and --adapter, or a full "
                       "fine-tuned checkpoint); this one has none")
    if feature_dim and not self.task.needs_adapter and self.task.uses_stage1:
      raise UsageError(f"{args.model}: a fine-tuned model with a condition adapter; run it with "
                       "--task se/tse/vc/l2s, or --task omni --omni_task ... for an Omni model")
    if self.task.needs_text and not uses_phones:
      raise UsageError(f"{args.model}: task {self.task.name!r} needs a phone-conditioned model "
                       "(MaskGCT T2S, Metis TTS); this one has no phone condition")
    g2p = None
    if uses_phones and self.task.needs_text:
      vocab = getattr(getattr(self.engine, "parts", None), "vocab", None) or args.vocab
      if not vocab:
        raise UsageError("a phone-conditioned model needs its phone vocabulary: --vocab vocab.json")
      try:
        g2p = g2p_lib.G2P(vocab)
        g2p_lib.setup_espeak()
      except (OSError, ValueError, ImportError) as e:
        raise UsageError(str(e)) from e
    if feature_dim:
      settings.visual_feature_dim = feature_dim
    self.ctx = decode_tasks.Context(settings, lambda: g2p, uses_phones, self.engine.stage1 is not None)
    # Process 0 writes the report (its own rows as they come, everyone's at the end).
    self.report = evaluation.Report(report_path(args) if self.primary else None)
    self.progress = Progress(self.total, stream if self.primary else None)
    self.jobs: list = []
    self.keys: dict = {}

  def log(self, message: str, every_process: bool = False) -> None:
    if self.primary or every_process:
      print(f"[decode] {message}", file=self.stream, flush=True)

  def fail(self, example, message: str) -> None:
    self.report.add({"id": example.id, "index": example.index, "task": self.task.name,
                     "status": "error", "error": message, "out": example.out_path})
    self.progress.failure()
    self.log(f"{example.id}: FAILED: {message}", every_process=True)

  def account(self, weighted_jobs):
    """A progress callback spreading each batch's wall time over its jobs (by weight)."""
    def callback(stage, indices, wall, total):
      members = [weighted_jobs[i] for i in indices]
      weights = np.asarray([max(1, w) for _, w in members], np.float64)
      for (job, _), share in zip(members, weights / max(weights.sum(), 1.0)):
        job.wall_seconds += wall * share
      self.progress.line(stage, total, wall)
    return callback

  def run(self) -> dict:
    from metis_jax.inference import tasks as decode_tasks  # pylint: disable=g-import-not-at-top
    d = self.defaults
    self.log(f"task {self.task.name}: {self.total} examples; stage 1 "
             f"{d.steps} steps cfg {d.cfg}; S2A {list(d.s2a_steps)} cfg {d.s2a_cfg} "
             f"(layer 0: {d.s2a_first_steps} steps cfg {d.s2a_first_cfg}); batches of "
             f"{self.engine.rows} on {self.layout.describe()}")
    if getattr(self.engine, "parts", None) is not None:
      self.log(f"parts: {self.engine.parts.describe()}")
    for ex, message in self.bad:
      self.fail(ex, message)
    for ex in self.examples:
      try:
        self.jobs.append(self.task.prepare(ex, self.ctx))
      except decode_tasks.ExampleError as e:
        self.fail(ex, str(e))
    self.progress.sync(self.layout)
    self.keys = {j.example.id: _keys(self.args.seed, j.example.stream_name) for j in self.jobs}
    self.encode()
    self.condition()
    if self.args.evaluate and self.engine.stage1 is not None:
      self.score_references()
    self.generate()
    for j in self.jobs:
      if j.error is not None:
        self.fail(j.example, j.error)
    return self.close()

  def encode(self) -> None:
    """Audio -> SSL tokens and codec codes (prompts, resynth clips, references), batched."""
    wav16, wav24, slots = [], [], []
    for j in self.jobs:
      if j.prompt_wav16 is not None:
        wav16.append(j.prompt_wav16); wav24.append(j.prompt_wav24); slots.append((j, "prompt"))
      if j.source_wav16 is not None:
        wav16.append(j.source_wav16); wav24.append(j.reference_wav24); slots.append((j, "source"))
      if j.reference_wav16 is not None:
        wav16.append(j.reference_wav16); wav24.append(None); slots.append((j, "reference"))
      if j.input_wav16 is not None and self.args.evaluate:  # the input's tokens: its token accuracy
        wav16.append(j.input_wav16); wav24.append(None); slots.append((j, "input"))
    # Collective: called even when this process has nothing to encode.
    tokens, codes = self.engine.encode_audio(
        wav16, wav24, self.account([(j, len(w) // 320) for (j, _), w in zip(slots, wav16)]))
    for (j, kind), tok, code in zip(slots, tokens, codes):
      if kind == "prompt":
        j.prompt_semantic, j.prompt_acoustic = tok, code
      elif kind == "source":
        _setup_resynth(j, tok, code, self.engine)
      elif kind == "input":
        j.input_semantic, j.input_wav16 = tok, None
      else:
        j.reference_semantic = tok
    for j in self.jobs:
      if (j.error is None and j.prompt_semantic is not None and len(j.prompt_semantic) == 0
          and j.prompt_wav16 is not None):
        j.error = "prompt_wav: too short to give any SSL token"
      if j.error is None and j.target_tokens < 1:
        j.error = "nothing to generate (0 target tokens)"

  def condition(self) -> None:
    """The condition frames of adapter tasks: features of each chunk's audio (se / tse / vc) or its
    given frames (l2s), over [prompt; target]; each chunk's target length follows from them."""
    if not self.engine.feature_dim:
      return
    slots = [(j, c) for j in self.jobs if j.error is None for c in j.chunks
             if c.condition_wav16 is not None]
    # Collective: called even when this process has nothing to compute.
    try:
      feats = self.engine.condition_features([c.condition_wav16 for _, c in slots], self.account(
          [(j, len(c.condition_wav16) // 320) for j, c in slots]))
    except ValueError as e:
      raise UsageError(str(e)) from e
    for (j, c), f in zip(slots, feats):
      c.features = f
      c.condition_wav16 = None
      c.tokens = len(f) - len(j.prompt_semantic)
    for j in self.jobs:
      if j.error is not None:
        continue
      for c in j.chunks:
        if c.target_features is not None:
          c.features = _condition_frames(len(j.prompt_semantic), c.target_features)
          c.tokens = len(c.target_features)
      if any(c.tokens < 1 for c in j.chunks if c.features is not None):
        j.error = "the input is too short: no frame to generate after the prompt"

  def score_references(self) -> None:
    """NLL of the references' SSL tokens under the stage-1 model (independent of the outputs)."""
    scored = [j for j in self.jobs if j.error is None and j.reference_semantic is not None
              and len(j.reference_semantic) and j.prompt_semantic is not None
              # adapter tasks: the frames of one call (windowed inputs are not scored)
              and (len(j.chunks) == 1 or j.chunks[0].features is None)]
    items = [_nll_item(j, self.engine, self.keys[j.example.id]) for j in scored]
    try:
      for j, nll in zip(scored, self.engine.masked_nll(items)):
        j.info["nll"] = nll
    except Exception as e:  # pylint: disable=broad-except
      for j in scored:
        j.info["evaluation_error"] = f"NLL: {type(e).__name__}: {e}"

  def generate(self) -> None:
    """Round r generates chunk r of every job that has one (prompted by chunk r - 1); the
    independent chunks of a job (windows of one input) all go in round 0."""
    live = [j for j in self.jobs if j.error is None]
    mode = self.args.chunk_prompt
    rounds = max((1 if j.independent_chunks else len(j.chunks) for j in live), default=0)
    rounds = int(self.layout.allgather(np.asarray([rounds], np.int32)).max())
    for r in range(rounds):
      units = [(j, c) for j in live if j.error is None for c in _round_chunks(j, r)]
      need = [(j, c) for j, c in units if j.chunks[c].semantic is None]
      # With a stage-1 model the call is collective (made with or without jobs of this process).
      if need or self.engine.stage1 is not None:
        items = [_stage1_item(j, c, mode, self.engine, self.keys[j.example.id]) for j, c in need]
        out = self._guarded("stage 1", [j for j, _ in need], lambda: self.engine.semantic(
            items, self.account([(j, j.chunks[c].tokens) for j, c in need])))
        for (j, c), tok in zip(need, out):
          if tok is not None:
            j.chunks[c].semantic = tok
      units = [(j, c) for j, c in units if j.error is None]
      items = [_render_item(j, c, mode, self.keys[j.example.id]) for j, c in units]
      out = self._guarded("rendering", [j for j, _ in units], lambda: self.engine.render(
          items, self.account([(j, j.chunks[c].tokens) for j, c in units])))
      done = []
      for (j, c), res in zip(units, out):
        if res is not None:
          j.chunks[c].audio, j.chunks[c].codes = res
          if j.error is None and all(ch.audio is not None for ch in j.chunks) and j not in done:
            done.append(j)
      for j in done:
        self.finish(j)
      self.progress.sync(self.layout)

  @staticmethod
  def _guarded(stage: str, jobs, fn) -> list:
    """fn()'s per-job outputs, or Nones with the jobs marked failed if it raises."""
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      for j in jobs:
        j.error = f"{stage} failed: {type(e).__name__}: {e}"
      return [None] * len(jobs)

  def finish(self, job) -> None:
    """Joins the chunks, writes the wav, evaluates, adds the report row."""
    import soundfile  # pylint: disable=g-import-not-at-top
    from metis_jax.inference import engine as decode_engine  # pylint: disable=g-import-not-at-top
    from metis_jax.inference import windows  # pylint: disable=g-import-not-at-top
    if job.independent_chunks:
      audio = windows.crossfade_join([c.audio for c in job.chunks], [c.offset for c in job.chunks])
    else:
      audio = np.concatenate([c.audio for c in job.chunks]).astype(np.float32)
    out = job.example.out_path
    try:
      os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
      soundfile.write(out, np.clip(audio, -1.0, 1.0), decode_engine.CODEC_RATE, subtype="PCM_16")
    except (OSError, RuntimeError) as e:
      job.error = f"{out}: cannot write ({e})"
      return
    seconds = len(audio) / decode_engine.CODEC_RATE
    row = {"id": job.example.id, "index": job.example.index, "task": self.task.name, "status": "ok",
           "out": out, "seconds": seconds, "target_tokens": job.target_tokens,
           "chunks": len(job.chunks), "wall_seconds": job.wall_seconds,
           "rtf": job.wall_seconds / seconds if seconds else None}
    if len(job.chunks) > 1 and job.chunks[0].text is not None:
      row["chunk_texts"] = [c.text for c in job.chunks]
    row.update(job.info)
    if self.args.evaluate:
      try:
        row.update(_metrics(job, audio, self.asr, self.speaker))
      except Exception as e:  # pylint: disable=broad-except
        row["evaluation_error"] = f"{type(e).__name__}: {e}"
    if self.args.html_report:
      try:
        row["media"] = _write_media(job, audio, out, report_path(self.args))
      except (OSError, RuntimeError, ValueError) as e:
        row["media_error"] = f"{type(e).__name__}: {e}"
    self.report.add(row)
    self.progress.finished(seconds)

  def close(self) -> dict:
    """Merges every process's report rows (process 0 writes them in manifest order); returns the
    summary of all examples (the same on every process)."""
    if self.layout.multiprocess:
      every = self.layout.allgather_json(self.report.rows)  # also the barrier before writing
      for rank, rows in enumerate(every):
        if rank != self.layout.process_rank:
          for row in rows:
            self.report.add(row)
    self.report.close()
    wall = time.perf_counter() - self.t_start
    summary = self.report.summary(wall)
    summary["report"] = report_path(self.args)
    if not self.primary:
      return summary
    if self.args.manifest:
      with open(os.path.join(self.args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if self.args.html_report:
      from metis_jax.inference import evaluation, report_html  # pylint: disable=g-import-not-at-top
      html_path = os.path.splitext(report_path(self.args))[0] + ".html"
      try:
        summary["html"] = report_html.write(html_path, self.report.rows, summary,
                                            evaluation.SUMMARY_COLUMNS)
      except OSError as e:
        self.log(f"{html_path}: cannot write the HTML report ({e})")
    print(self.report.table(), file=self.stream)
    rtf = f"{summary['rtf']:.3f}" if summary["rtf"] else "-"
    self.log(f"{summary['ok']}/{summary['examples']} examples, {summary['audio_seconds']:.1f} s of "
             f"audio in {wall:.1f} s ({summary['examples_per_second']:.2f} examples/s, RTF {rtf}); "
             f"report {summary['report']}")
    return summary


def _write_media(job, audio, out_path, report) -> dict:
  """The example's input, prompt, output and reference as wavs (the output's own file) with their
  spectrograms, for report.html."""
  from metis_jax.inference import engine as decode_engine, report_html  # pylint: disable=g-import-not-at-top
  rate = decode_engine.CODEC_RATE
  media = {"output": (audio, rate, out_path)}
  if job.input_wav24 is not None:
    media["input"] = (job.input_wav24, rate, None)
  elif job.source_wav16 is not None:
    media["input"] = (job.source_wav16, decode_engine.SSL_RATE, None)
  if job.prompt_wav24 is not None:
    media["prompt"] = (job.prompt_wav24, rate, None)
  if job.reference_wav24 is not None:
    media["reference"] = (job.reference_wav24, rate, None)
  elif job.reference_wav16 is not None:
    media["reference"] = (job.reference_wav16, decode_engine.SSL_RATE, None)
  return report_html.write_media(report_html.files_dir(report), job.example.id, media)


def _setup_resynth(job, tokens, codes, engine) -> None:
  """Splits a resynth clip into prompt and target once its tokens are known."""
  from metis_jax.inference import tasks as decode_tasks  # pylint: disable=g-import-not-at-top
  if job.prompt_wav16 is not None:  # separate prompt: render the whole clip
    job.chunks = [decode_tasks.Chunk(tokens=len(tokens), semantic=tokens)]
    job.reference_wav24 = None
    return
  frames = min(len(tokens), len(codes))
  p = min(int(round(job.info["prompt_seconds"] * decode_tasks.TOKENS_PER_SECOND)), frames - 1)
  job.prompt_semantic, job.prompt_acoustic = tokens[:p], codes[:p]
  target = tokens[p:]
  job.chunks = [decode_tasks.Chunk(tokens=len(target), semantic=target)]
  hop = engine.hop
  job.reference_wav24 = job.reference_wav24[p * hop:(p + len(target)) * hop]
  job.reference_semantic = target
  job.info["prompt_frames"] = p


def _round_chunks(job, r: int) -> list:
  """Indices of the chunks of `job` generated in round r."""
  if job.independent_chunks:
    return list(range(len(job.chunks))) if r == 0 else []
  return [r] if r < len(job.chunks) else []


def _condition_frames(prompt_tokens: int, target_features):
  from metis_jax.inference import tasks as decode_tasks  # pylint: disable=g-import-not-at-top
  return decode_tasks.condition_frames(prompt_tokens, target_features)


def _round_prompt(job, r, mode):
  if r == 0 or mode == "original" or job.independent_chunks:
    return job.prompt_semantic, job.prompt_acoustic, job.prompt_phones
  prev = job.chunks[r - 1]
  return prev.semantic, prev.codes, prev.phones


def _stage1_item(job, r, mode, engine, keys):
  from metis_jax.inference import engine as decode_engine  # pylint: disable=g-import-not-at-top
  sem, _, phones = _round_prompt(job, r, mode)
  chunk = job.chunks[r]
  all_phones = None
  if engine.uses_phones:
    all_phones = np.concatenate([np.zeros((0,), np.int32) if phones is None else phones,
                                 np.zeros((0,), np.int32) if chunk.phones is None else chunk.phones])
  return decode_engine.Stage1Item(prompt=sem, target_len=chunk.tokens,
                                  key=keys(STAGE1_STREAM, r), phones=all_phones, features=chunk.features)


def _render_item(job, r, mode, keys):
  from metis_jax.inference import engine as decode_engine  # pylint: disable=g-import-not-at-top
  sem, ac, _ = _round_prompt(job, r, mode)
  p = min(len(sem), len(ac))
  return decode_engine.RenderItem(prompt_semantic=sem[:p], prompt_acoustic=ac[:p],
                                  target_semantic=job.chunks[r].semantic,
                                  key=keys(RENDER_STREAM, r))


def _nll_item(job, engine, keys):
  from metis_jax.inference import engine as decode_engine  # pylint: disable=g-import-not-at-top
  phones = None
  if engine.uses_phones:
    parts = [job.prompt_phones] + [c.phones for c in job.chunks]
    phones = np.concatenate([np.zeros((0,), np.int32)] + [p for p in parts if p is not None])
  target, features = job.reference_semantic, None
  if job.chunks and job.chunks[0].features is not None:  # adapter tasks: the reference under the condition
    chunk = job.chunks[0]
    target = target[:chunk.tokens]
    features = chunk.features[:len(job.prompt_semantic) + len(target)]
  return decode_engine.NLLItem(prompt=job.prompt_semantic, target=target,
                               key=keys(NLL_STREAM), phones=phones, features=features)


def _metrics(job, audio, asr, speaker) -> dict:
  """Signal metrics against a time-aligned reference, and the ASR / speaker hooks."""
  from metis_jax.inference import engine as decode_engine, evaluation  # pylint: disable=g-import-not-at-top
  m = {}
  rate = decode_engine.CODEC_RATE
  if job.reference_wav24 is not None and len(job.reference_wav24):
    m.update(evaluation.signal_metrics(audio, job.reference_wav24, rate))
    if job.input_wav24 is not None:  # se / tse / aligned vc: the input itself, the baseline
      m.update(evaluation.signal_metrics(job.input_wav24, job.reference_wav24, rate,
                                         suffix=evaluation.INPUT_SUFFIX))
    ref_tokens = job.reference_semantic
    if ref_tokens is not None and len(ref_tokens) and job.input_wav24 is not None:
      if len(job.chunks) == 1 and job.chunks[0].semantic is not None:  # windows: no one token stream
        m["token_accuracy"] = evaluation.token_accuracy(job.chunks[0].semantic, ref_tokens)
      if job.input_semantic is not None:
        m["token_accuracy_input"] = evaluation.token_accuracy(job.input_semantic, ref_tokens)
  if asr is not None and job.text:
    transcript = asr(audio, rate, job.language)
    m["transcript"] = transcript
    m["wer"] = evaluation.word_error_rate(transcript, job.text)
  voice = job.prompt_wav24 if job.prompt_wav24 is not None else job.reference_wav24
  if speaker is not None and voice is not None and len(voice):
    m["speaker_similarity"] = evaluation.cosine_similarity(speaker(audio, rate), speaker(voice, rate))
  return m


# ----------------------------------------------------------------------------- entry points


def start_processes(args: Args) -> None:
  """Joins the multi-process job the flags (or METIS_* variables, or a TPU VM) describe, if any,
  and sets up the compilation cache. Must come before anything touches the devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from metis_jax import cli_support  # pylint: disable=g-import-not-at-top
  from metis_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  try:
    compilation_cache.enable(args.compilation_cache_dir)
    if not jax.distributed.is_initialized():
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  except (ValueError, cli_support.UserError) as e:
    raise UsageError(str(e)) from e


def run_cli(argv: Sequence[str], stream=None) -> int:
  """Parses `argv` (argv[0] is the program name) and runs; returns the exit status."""
  stream = stream or sys.stderr
  fv = define_flags(flags.FlagValues())
  try:
    fv(list(argv))
  except flags.Error as e:
    print(f"error: {e}", file=stream)
    return 2
  args = Args.from_flags(fv)
  try:
    start_processes(args)
    summary = run(args, stream)
  except UsageError as e:
    print(f"error: {e}", file=stream)
    return 2
  return 0 if summary["failed"] == 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    fv = define_flags(flags.FlagValues())
    print(__doc__)
    print(fv.get_help())
    sys.exit(0)
  sys.exit(run_cli(argv))



def run_main() -> None:
  """`python -m metis_jax.decode`."""
  main()
