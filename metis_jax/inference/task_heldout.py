"""Held-out SE / TSE / VC sets of a fine-tune's task corpus, written as audio files and decode manifests.

For every held-out target utterance (`data.demo.is_heldout` on the demo corpus: the
last sentence of each voice, never trained on), the task's corruption is made by the
fine-tuning data's own builders (`data.tasks.build_se / build_tse / build_vc`) with the
fine-tune's task options, and written as 16 kHz float wavs under `<out>/<task>/`:

  se   <id>_noisy.wav    input: the clean target + noise at an SNR drawn from `snr_db`
  tse  <id>_mixture.wav  input: the target + another speaker at an SIR drawn from `sir_db`
       <id>_prompt.wav   enrollment: the start of another utterance of the target speaker
                         (the builder's 320 P samples and the next 80: P tokens, as trained)
  vc   <id>_source.wav   input: the target with its timbre perturbed (pitch, formants)
       <id>_prompt.wav   the target speaker's voice: another of their utterances
  all  <id>_clean.wav    the reference: the clean target, at the scale it has in the input

and `<out>/<task>/manifest.jsonl`, one line per example as `python -m metis_jax.decode
--task <task> --manifest` reads it (`wav`, `prompt_wav`, `reference_wav`; VC adds
`reference_aligned`: its source keeps the target's timing), plus the draws
(`snr_db`, `sir_db`, `semitones`, `formant_factor`), the record ids and the prompt length.

Targets are cropped (`data.tasks.crop`) to what the fine-tune trained on, so [prompt;
target] fits its `train.seq_length`: seq_length tokens (SE) or seq_length minus the
largest prompt (TSE, VC). SE mixes noise only (`reverb_prob` 0): a reverberant mixture
has no dry reference at its scale. Prompts and interferers may come from the training
utterances (seen voices; the benchmark's pool), targets never.

Deterministic: example k draws everything (crop, prompt, interferer, SNR / SIR /
perturbation) from `np.random.default_rng([seed, record index])`.
"""

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from metis_jax.data import noise as noise_lib
from metis_jax.data import tasks as task_data

TASKS = ("se", "tse", "vc")
SAMPLE_RATE = task_data.SR  # 16 kHz
MANIFEST_NAME = "manifest.jsonl"
# What the input of each task is called (the file <id>_<name>.wav).
INPUT_NAMES = {"se": "noisy", "tse": "mixture", "vc": "source"}


class HeldoutError(ValueError):
  """A task corpus the held-out set cannot be made from (the message names the file or option)."""


@dataclasses.dataclass(frozen=True)
class TaskCorpus:
  """Where a fine-tune's task data lives and how its examples are made.

  Attributes:
    source: shard folder of the task corpus (records naming their audio, `--record_sources`).
    opts: `data.tasks.TaskOptions` (the fine-tune's; `features='audio'`).
    noise_dirs, rir_dirs: SE noise and room-response folders.
    audio_root: corpus root of the records' 'src' ('' = the shard manifest's input).
  """
  source: str
  opts: task_data.TaskOptions
  noise_dirs: tuple = ()
  rir_dirs: tuple = ()
  audio_root: str = ""


def corpus_of_run(config: dict) -> TaskCorpus:
  """The task corpus of a fine-tune from its workdir's `config.json` (a dict).

  Raises:
    HeldoutError: the config is not a fine-tune's, or its shard folder is gone.
  """
  f, data, train = config.get("finetune") or {}, config.get("data") or {}, config.get("train") or {}
  sources = data.get("train_sources") or ()
  if not sources or "seq_length" not in train:
    raise HeldoutError("config.json: no data.train_sources / train.seq_length: not the config of a fine-tune "
                       "trained on task data")
  if not os.path.isdir(sources[0]):
    raise HeldoutError(f"config.json: data.train_sources {sources[0]}: no such folder (the task shards the "
                       "fine-tune trained on); re-run the fine-tune or restore its base's demo_data/tasks")
  names = {field.name for field in dataclasses.fields(task_data.TaskOptions)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in f.items() if k in names}
  values.update(max_length=int(train["seq_length"]), features="audio", reverb_prob=0.0)
  try:
    opts = task_data.TaskOptions(**values)
  except (TypeError, ValueError) as e:
    raise HeldoutError(f"config.json: finetune options: {e}") from e
  return TaskCorpus(sources[0], opts, tuple(f.get("noise_dirs") or ()), tuple(f.get("rir_dirs") or ()),
                    f.get("audio_root") or "")


def _name(record_id: str, taken: set) -> str:
  """The file-name id of a record: its last path component ('de/de_f3/de_f3_007' -> 'de_f3_007')."""
  name = record_id.rsplit("/", 1)[-1] or "example"
  if name in taken:
    name = record_id.replace("/", "_")
  taken.add(name)
  return name


def _write(path: str, wav: np.ndarray) -> str:
  import soundfile  # pylint: disable=g-import-not-at-top
  soundfile.write(path, np.asarray(wav, np.float32), SAMPLE_RATE, subtype="FLOAT")
  return os.path.basename(path)


def _pick(candidates: np.ndarray, rng: np.random.Generator, what: str, target_id: str) -> int:
  if len(candidates) == 0:
    raise HeldoutError(f"held-out target {target_id!r}: no utterance for the {what}")
  return int(candidates[rng.integers(len(candidates))])


def _make(task: str, reader, index, target_i: int, corpus: TaskCorpus, noises, seed: int) -> dict:
  """One example: {'element', 'clean' [n] (the reference), 'prompt' [320 P] or None, 'input' [n],
  'ids'}; the builders' draws are in element['parts']."""
  opts = corpus.opts
  rng = np.random.default_rng([seed, target_i])
  utt = reader.utterance(target_i)
  longest = opts.max_length if task == "se" else opts.max_length - opts.prompt_tokens[1]
  target = task_data.crop(utt, longest, rng)
  ids = {"target": utt.id}
  prompt = None
  if task == "se":
    element = task_data.build_se(target, rng, opts, noises)
  else:
    speaker = index.speakers[target_i]
    same = index.by_speaker.get(int(speaker), np.zeros((0,), np.int64))
    prompt_i = _pick(same[same != target_i], rng, "prompt (another utterance of the speaker)", utt.id)
    prompt = reader.utterance(prompt_i)
    ids["prompt"] = prompt.id
    if task == "tse":
      pool = index.pool[index.speakers[index.pool] != speaker]
      other_i = _pick(pool, rng, "interferer (another speaker)", utt.id)
      interferer = reader.utterance(other_i)
      ids["interferer"] = interferer.id
      element = task_data.build_tse(target, prompt, interferer, rng, opts)
    else:
      element = task_data.build_vc(target, prompt, rng, opts)
  p = element["prompt_length"]
  if not np.array_equal(element["tokens"][p:], target.tokens):
    raise HeldoutError(f"{utt.id}: the {task} builder cropped the target again (max_length "
                       f"{opts.max_length}); the reference would not match")
  cond, parts = element["cond_audio"], element["parts"]
  split = task_data.SAMPLES_PER_TOKEN * p  # [prompt audio; input] as one waveform
  clean = target.wav if task == "vc" else parts["speech"]  # se / tse: the speech at its scale in the mix
  prompt_wav = _prompt_file_audio(cond[:split], prompt.wav) if p else None
  return {"element": element, "clean": clean, "prompt": prompt_wav, "input": cond[split:],
          "ids": ids, "prompt_tokens": int(p)}


def _prompt_file_audio(used: np.ndarray, whole: np.ndarray) -> np.ndarray:
  """The prompt as written: the 320 P samples the builder used plus the utterance's next 80, at the
  builder's gain. The tokenizer gives P tokens for 320 P + 80 samples (P - 1 for 320 P), so the
  decode's prompt has the P tokens trained on and its [prompt; input] frames stay on the input's
  320-sample grid (within 80 samples)."""
  n = len(used)
  if len(whole) < n + task_data.EDGE or not np.any(used):
    return used
  gain = float(np.linalg.norm(used) / max(np.linalg.norm(whole[:n]), 1e-12))
  return (whole[:n + task_data.EDGE] * gain).astype(np.float32)


def _draws(task: str, parts: dict) -> dict:
  keys = {"se": ("snr_db",), "tse": ("sir_db",), "vc": ("semitones", "formant_factor")}[task]
  return {k: float(parts[k]) for k in keys}


def write_task_set(task: str, corpus: TaskCorpus, out_dir: str, seed: int = 0,
                   target_filter: Optional[Callable[[str], bool]] = None, max_examples: int = 0) -> str:
  """Writes the held-out set of one task (module doc) under `out_dir`; returns the manifest path.

  Args:
    task: se, tse or vc.
    corpus: the fine-tune's `TaskCorpus`.
    out_dir: folder for the wavs and manifest.jsonl (created).
    seed: fixes every draw.
    target_filter: record id -> a held-out target (default `data.demo.is_heldout`).
    max_examples: the first N targets in record order (0 = all).

  Raises:
    HeldoutError: unknown task, no noise for SE, no usable target.
  """
  from metis_jax.data import demo  # pylint: disable=g-import-not-at-top
  if task not in TASKS:
    raise HeldoutError(f"task {task!r}: the held-out sets are made for {', '.join(TASKS)}")
  try:
    reader = task_data.CorpusReader(corpus.source, corpus.audio_root)
    table = task_data.scan_records(reader)
    index = task_data.build_index(table, target_filter or demo.is_heldout, lambda _: True)
    noises = None
    if task == "se":
      noises = noise_lib.NoiseBank(corpus.noise_dirs, corpus.rir_dirs)
      if not noises.noise_files:
        raise HeldoutError(f"{corpus.source}: SE needs noise: the fine-tune's finetune.noise_dirs "
                           f"{list(corpus.noise_dirs)} hold no audio")
  except (OSError, ValueError) as e:
    if isinstance(e, HeldoutError):
      raise
    raise HeldoutError(f"{corpus.source}: {str(e).removeprefix('error: ')}") from e
  targets = [int(i) for i in index.targets if table.lengths[i] >= corpus.opts.min_tokens]
  if max_examples > 0:
    targets = targets[:max_examples]
  if not targets:
    raise HeldoutError(f"{corpus.source}: no held-out target of at least {corpus.opts.min_tokens} tokens")
  os.makedirs(out_dir, exist_ok=True)
  lines, taken = [], set()
  for i in targets:
    ex = _make(task, reader, index, i, corpus, noises, seed)
    name = _name(ex["ids"]["target"], taken)
    line = {"id": name, "wav": _write(os.path.join(out_dir, f"{name}_{INPUT_NAMES[task]}.wav"), ex["input"]),
            "reference_wav": _write(os.path.join(out_dir, f"{name}_clean.wav"), ex["clean"])}
    if ex["prompt"] is not None:
      line["prompt_wav"] = _write(os.path.join(out_dir, f"{name}_prompt.wav"), ex["prompt"])
    if task == "vc":
      line["reference_aligned"] = True
    line.update(_draws(task, ex["element"]["parts"]))
    line.update(record_ids=ex["ids"], prompt_tokens=ex["prompt_tokens"],
                target_tokens=int(len(ex["element"]["tokens"]) - ex["prompt_tokens"]))
    lines.append(line)
  path = os.path.join(out_dir, MANIFEST_NAME)
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return path
