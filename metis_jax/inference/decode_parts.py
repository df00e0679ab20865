"""Which files make up a decode, and whether they belong together.

`resolve(args, task)` gathers the paths of every part of a run, each from the
first place that has it:
  1. its own flag (`--model`, `--s2a_full`, `--s2a_1layer`, `--codec` /
     `--codec_encoder` + `--codec_decoder`, `--tokenizer`, `--vocab`);
  2. the default job's workdir, when `--model` is one (`decode_bundle.json`,
     `demo_bundle`): both S2A models, the k-means SSL tokenizer, and the
     Griffin-Lim mel renderer over its residual k-means acoustic tokenizer
     (in the codec's place: the demo's S2A models learned those tokens);
  3. the released folder (`--released_dir`, `conversion.released`): the
     stage-1 model the task runs (MaskGCT T2S for tts; the Metis base for
     continue when present, else T2S; base + LoRA + adapter for se / tse / vc;
     the full files for l2s / omni), both S2A models, the codec files, the
     phone vocabulary, and the SSL tokenizer from w2v-BERT 2.0 + its
     statistics + the semantic codec.
`check(parts)` then runs `fingerprint.check_compatible` over the models'
`lineage.json` and the fingerprints of the tokenizer and codec / acoustic
tokenizer given, before anything is loaded: a model trained on another
tokenizer or codec is refused with one line naming the part. A part is only
fingerprinted when some model records what it was trained on (released
weights record nothing, so multi-GB files are not hashed for nothing).
"""

import dataclasses
import hashlib
import os
from typing import Optional

from metis_jax.data import fingerprint

# part name -> where it came from
FLAG, BUNDLE, RELEASED = "flag", "bundle", "released"

# The released stage-1 model each task runs (`released.STAGE1_PARTS`); continue falls back to t2s.
RELEASED_STAGE1 = {"tts": "t2s", "continue": "metis_base", "se": "metis_se", "tse": "metis_tse",
                   "vc": "metis_vc", "l2s": "metis_l2s", "omni": "metis_omni"}


class PartsError(ValueError):
  """Parts that cannot be gathered (one line naming the flag / file)."""


@dataclasses.dataclass
class DecodeParts:
  """The paths of a run's parts (None: not given).

  Attributes:
    stage1, lora, adapter: the stage-1 model (file, folder or workdir) and a fine-tune's files.
    s2a_full, s2a_1layer: the S2A models.
    tokenizer: an SSL tokenizer folder; or `tokenizer_files` (w2v-BERT, stats .npz, semantic
      codec) from a released folder.
    codec_encoder, codec_decoder: the acoustic codec (a folder in `codec_encoder` and no decoder,
      or two files).
    renderer: a residual k-means acoustic tokenizer folder rendered by Griffin-Lim (the demo),
      with `renderer_options` (`mel_renderer.MelRenderer` keywords).
    vocab: the phone vocabulary.
    origin: {part: FLAG | BUNDLE | RELEASED}.
  """
  stage1: Optional[str] = None
  lora: Optional[str] = None
  adapter: Optional[str] = None
  s2a_full: Optional[str] = None
  s2a_1layer: Optional[str] = None
  tokenizer: Optional[str] = None
  tokenizer_files: Optional[tuple] = None
  codec_encoder: Optional[str] = None
  codec_decoder: Optional[str] = None
  renderer: Optional[str] = None
  renderer_options: dict = dataclasses.field(default_factory=dict)
  vocab: Optional[str] = None
  origin: dict = dataclasses.field(default_factory=dict)

  @property
  def has_tokenizer(self) -> bool:
    return bool(self.tokenizer or self.tokenizer_files)

  @property
  def has_acoustic(self) -> bool:
    return bool(self.renderer or self.codec_encoder)  # the loader names a wrong path

  def describe(self) -> str:
    """One line: each part given, with where it came from."""
    shown = []
    for name in ("stage1", "lora", "adapter", "s2a_1layer", "s2a_full", "tokenizer", "codec_encoder",
                 "codec_decoder", "renderer", "vocab"):
      value = getattr(self, name)
      if name == "tokenizer" and value is None and self.tokenizer_files:
        value = "w2v-BERT " + os.path.dirname(self.tokenizer_files[0])
      if value:
        label = "renderer (Griffin-Lim mel)" if name == "renderer" else name
        shown.append(f"{label} {value} ({self.origin.get(name, FLAG)})")
    return "; ".join(shown)


def _strip(message: str) -> str:
  return message[len("error: "):] if message.startswith("error: ") else message


def _set(parts: DecodeParts, name: str, value, origin: str) -> None:
  if value and not getattr(parts, name):
    setattr(parts, name, value)
    parts.origin[name] = origin


def _released_stage1(released_dir: str, found: dict, task_name: str) -> tuple:
  """(model, lora, adapter) paths of the released stage-1 model a task runs."""
  from metis_jax.conversion import released  # pylint: disable=g-import-not-at-top
  part = RELEASED_STAGE1.get(task_name, "t2s")
  if part == "metis_base" and "metis_base" not in found:
    part = "t2s"
  try:
    files = released.stage1_files(released_dir, part)
  except FileNotFoundError as e:
    raise PartsError(f"{_strip(str(e))} (or give the stage-1 model with --model)") from e
  return files["input"], files["lora"], files["adapter"]


def resolve(args, task) -> DecodeParts:
  """The parts of a run from the flags, the default job's workdir and the released folder.

  Args:
    args: `cli.Args` (the flags).
    task: the `tasks.Task` (its name picks the released stage-1 model; resynth needs none).

  Raises:
    PartsError: an unreadable bundle, or a released folder that cannot give a needed part.
  """
  from metis_jax.inference import demo_bundle  # pylint: disable=g-import-not-at-top
  parts = DecodeParts()
  for name, flag in (("stage1", "model"), ("lora", "lora"), ("adapter", "adapter"), ("s2a_full", "s2a_full"),
                     ("s2a_1layer", "s2a_1layer"), ("tokenizer", "tokenizer"), ("vocab", "vocab"),
                     ("codec_decoder", "codec_decoder")):
    _set(parts, name, args.values.get(flag), FLAG)
  _set(parts, "codec_encoder", args.codec or args.codec_encoder, FLAG)
  if args.codec:
    parts.codec_decoder = None  # the folder holds both files

  if demo_bundle.is_bundle(args.model):
    try:
      bundle = demo_bundle.read_bundle(args.model)
    except (OSError, ValueError) as e:
      raise PartsError(_strip(str(e))) from e
    paths = bundle["paths"]
    for name in ("s2a_full", "s2a_1layer"):
      _set(parts, name, paths[name], BUNDLE)
    _set(parts, "tokenizer", paths["ssl_tokenizer"], BUNDLE)
    if not parts.codec_encoder:
      _set(parts, "renderer", paths["acoustic_tokenizer"], BUNDLE)
      parts.renderer_options = {k: v for k, v in bundle.get("renderer", {}).items() if k != "type"}

  if args.released_dir:
    from metis_jax.conversion import released  # pylint: disable=g-import-not-at-top
    try:
      found = released.resolve(args.released_dir)
    except FileNotFoundError as e:
      raise PartsError(_strip(str(e))) from e
    if task.uses_stage1 and not parts.stage1:
      model, lora, adapter = _released_stage1(args.released_dir, found, task.name)
      _set(parts, "stage1", model, RELEASED)
      _set(parts, "lora", lora, RELEASED)
      _set(parts, "adapter", adapter, RELEASED)
    flags = released.decode_flags(args.released_dir)
    for name in ("s2a_full", "s2a_1layer", "vocab"):
      _set(parts, name, flags.get(name), RELEASED)
    if not parts.codec_encoder and not parts.renderer and "codec_encoder" in flags and "codec_decoder" in flags:
      _set(parts, "codec_encoder", flags["codec_encoder"], RELEASED)
      _set(parts, "codec_decoder", flags["codec_decoder"], RELEASED)
    if not parts.has_tokenizer:
      try:
        parts.tokenizer_files = released.tokenizer_files(args.released_dir)
      except FileNotFoundError as e:
        raise PartsError(f"{_strip(str(e))} (or give an SSL tokenizer folder with --tokenizer)") from e
      parts.origin["tokenizer"] = RELEASED
  return parts


def missing(parts: DecodeParts, task) -> list:
  """The flags a run still needs, as words for one error line."""
  lost = []
  if not parts.s2a_full:
    lost.append("--s2a_full")
  if not parts.has_tokenizer:
    lost.append("--tokenizer")
  if not parts.has_acoustic:
    lost.append("--codec (or --codec_encoder and --codec_decoder)")
  if task.uses_stage1 and not parts.stage1:
    lost.append("--model")
  if (parts.lora or parts.adapter) and not parts.stage1:
    lost.append("--model (the base model --lora / --adapter apply to)")
  return lost


# ----------------------------------------------------------------------------- the check


def _tokenizer_fingerprint(parts: DecodeParts) -> str:
  if parts.tokenizer:
    return fingerprint.fingerprint(parts.tokenizer)
  h = hashlib.sha256("".join(f"{k}={fingerprint.file_fingerprint(p)}\n" for k, p in
                             zip(("encoder", "stats", "codec"), parts.tokenizer_files)).encode())
  return "sha256:" + h.hexdigest()[:16]


def _acoustic(parts: DecodeParts) -> tuple:
  """(path shown, fingerprint fn) of the acoustic tokenizer or codec."""
  if parts.renderer:
    return parts.renderer, lambda: fingerprint.fingerprint(parts.renderer)
  shown = parts.codec_encoder if not parts.codec_decoder else f"{parts.codec_encoder} + {parts.codec_decoder}"
  return shown, lambda: fingerprint.codec_fingerprint(parts.codec_encoder, parts.codec_decoder)


def check(parts: DecodeParts) -> None:
  """Raises `fingerprint.IncompatiblePartsError` (one line) unless the parts belong together.

  Models are the stage-1 and S2A paths (their `lineage.json`, when folders);
  the data parts are 'ssl_tokenizer' (the tokenizer) and 'acoustic_tokenizer'
  (the demo's acoustic tokenizer, or the acoustic codec).
  """
  check_parts = {}
  for name in ("stage1", "s2a_1layer", "s2a_full"):
    path = getattr(parts, name)
    if path:
      check_parts[name] = fingerprint.model_part(os.path.abspath(path))
  recorded = {k for spec in check_parts.values() for k in spec["trained_on"]}
  if "ssl_tokenizer" in recorded and parts.has_tokenizer:
    shown = parts.tokenizer or os.path.dirname(parts.tokenizer_files[0])
    check_parts["ssl_tokenizer"] = {"path": shown, "fingerprint": _tokenizer_fingerprint(parts)}
  if "acoustic_tokenizer" in recorded and parts.has_acoustic:
    shown, fp = _acoustic(parts)
    check_parts["acoustic_tokenizer"] = {"path": shown, "fingerprint": fp()}
  fingerprint.check_compatible(check_parts)
