r"""Demo fine-tunes from the tiny base, scored on held-out demo utterances against baselines.

  python benchmarks/finetune_demo.py --base /tmp/metis_tiny --out /tmp/ft_demo --tasks se,tse,vc,tts,l2s --steps 200

For each task: fine-tune `configs/finetune_tiny.py:<task>` from `--base` (the default
job's workdir; a finished fine-tune in `--out/<task>` is restored, not trained again),
then score it on the held-out targets (the last sentence of every demo voice,
`demo.is_heldout`; prompts and interferers may be any utterance), made `--eval_seeds`
times with different draws (prompt, noise, SNR/SIR, pitch shift), all rows in one batch.

SE, TSE, VC, L2S: token accuracy of the decoded target against the clean target's tokens,
with the task's reference decoding settings (SE/TSE 10 steps cfg 0, VC 20 steps cfg 1,
L2S 25 steps cfg 2.5; `inference.tasks.DECODE_DEFAULTS`), for
  finetuned   the fine-tuned model (LoRA merged) with its condition (cheap features of
              the condition audio; L2S: the demo's synthetic visual features);
  base        the base model without the condition (prompt only: TSE/VC/L2S; nothing: SE);
  trivial     SE/TSE/VC: the tokens of the corrupted signal alone (the noisy mix, the
              mixture, the perturbed source) by the demo's own tokenizer;
  trivial_with_prompt  the same signal tokenized behind the prompt audio (the whole
              condition waveform, as an earlier version of this script scored it; the
              tokenizer normalizes per utterance, so the prompt shifts the tokens);
  majority    every target token = the most frequent token of the training records.
Masked-token accuracy (argmax at masked target positions, the prompt visible, fixed
mask ratios; t = gamma^-1(ratio)) of the same models, one forward each: `masked_<model>`.

TTS: masked-token accuracy on held-out [prompt; target] rows at the fixed mask ratios for
  finetuned            the fine-tune (LoRA + phone prefix) with the phones;
  finetuned_no_phones  the same fine-tuned model with its phone prefix removed (every
                       phone slot invalid);
  base                 the base model (no phone prefix at all);
  majority             as above.

Prints one JSON line per task, then all results.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax import config_lib
from metis_jax.data import demo
from metis_jax.data import tasks
from metis_jax.data import tokenizer as tk
from metis_jax.inference import decoding
from metis_jax.inference import tasks as inference_tasks
from metis_jax.models import masking
from metis_jax.models import metis
from metis_jax.nn import lora as lora_lib
from metis_jax.training import finetune_base
from metis_jax.training import finetune_export
from metis_jax.training import finetune_objective as fto
from metis_jax.training import loop

MASK_RATIOS = (0.3, 0.6, 1.0)
DECODED_TASKS = ("se", "tse", "vc", "l2s")


# ----------------------------------------------------------------------------- held-out data


def heldout_elements(config, seeds: int) -> list[dict]:
  """Task elements (module doc of `data.tasks`, with 'parts') of every held-out target, `seeds` draws each."""
  f = config.finetune
  opts = fto.task_options(config)
  out = []
  for s in range(seeds):
    ds = tasks.task_element_dataset(
        f.task, config.data.train_sources[0], opts, seed=1234 + 7919 * s, num_epochs=1, audio_root=f.audio_root,
        noise_dirs=tuple(f.noise_dirs), rir_dirs=tuple(f.rir_dirs), target_filter=demo.is_heldout,
        pool_filter=lambda i: True, keep_parts=True)
    out.extend(e for e in ds if not e["error"])
  if not out:
    raise SystemExit(f"error: no held-out {f.task} example could be made from {config.data.train_sources[0]}")
  return out


def majority_token(config) -> int:
  """The most frequent token of the training (not held-out) records."""
  reader = tasks.CorpusReader(config.data.train_sources[0], config.finetune.audio_root)
  counts = np.zeros((int(config.model.vocab_size),), np.int64)
  for i in range(len(reader)):
    utt = reader.utterance(i, with_audio=False)
    if not demo.is_heldout(utt.id):
      counts += np.bincount(utt.tokens, minlength=len(counts))[:len(counts)]
  return int(counts.argmax())


def collate(config, elements: list[dict]) -> dict[str, np.ndarray]:
  """All elements as one training-format batch (`data.tasks.collate`), phones padded to the config's width."""
  opts = fto.task_options(config)
  batch = tasks.collate(elements, len(elements), (int(config.train.seq_length),), (config.finetune.task,), opts)
  if "phones" in batch:
    pad = int(config.finetune.phone_length) - batch["phones"].shape[1]
    batch["phones"] = np.pad(batch["phones"], ((0, 0), (0, pad)), constant_values=opts.phone_pad_id)
    batch["phone_valid"] = np.pad(batch["phone_valid"], ((0, 0), (0, pad)))
  return batch


def target_mask(batch) -> np.ndarray:
  """`[B, T]` bool: the target positions (valid, after the prompt)."""
  index = np.arange(batch["tokens"].shape[1])[None]
  return batch["valid"] & (index >= batch["prompt_lengths"][:, None])


# ----------------------------------------------------------------------------- scores


def accuracy(predicted: np.ndarray, batch) -> float:
  """Share of target tokens equal to `predicted [B, T]` (aligned with the batch's tokens)."""
  scored = target_mask(batch)
  return float(((predicted == batch["tokens"]) & scored).sum() / max(scored.sum(), 1))


def decoded_tokens(model, params, batch, steps: int, cfg: float, features=None) -> np.ndarray:
  """`[B, T]` tokens: the prompt as given, the target decoded (`inference.decoding.MetisDecoder`)."""
  p = batch["prompt_lengths"]
  n = batch["valid"].sum(-1)
  b, length = batch["tokens"].shape
  p_len = max(1, int(p.max()))
  prompt = np.where(np.arange(p_len)[None] < p[:, None], batch["tokens"][:, :p_len], 0)
  decoder = decoding.MetisDecoder(model, decoding.DecodeOptions(steps=steps, cfg=cfg))
  keys = jax.random.split(jax.random.key(0), b)
  out = decoder(params, keys, jnp.asarray(prompt), jnp.asarray(p), jnp.asarray(n - p), target_len=length,
                features=None if features is None else jnp.asarray(features))
  out = np.asarray(out)
  tokens = np.zeros_like(batch["tokens"])
  for r in range(b):
    tokens[r, :p[r]] = batch["tokens"][r, :p[r]]
    tokens[r, p[r]:n[r]] = out[r, :n[r] - p[r]]
  return tokens


def masked_accuracies(model, params, batch, schedule: str, **inputs) -> dict[str, float]:
  """Masked-token accuracy at each of MASK_RATIOS (module doc): {'r0.3': acc, ...}."""
  grid = np.linspace(1e-5, 1.0, 10001)
  gammas = masking.mask_ratio(grid, schedule)
  scored = target_mask(batch)
  apply = jax.jit(lambda p, x, m, v, t, i: model.apply({"params": p}, x, m, v, t, **i)[1])
  out = {}
  for k, ratio in enumerate(MASK_RATIOS):
    draw = np.random.default_rng(100 + k).random(scored.shape) < ratio
    is_masked = scored & draw
    t = np.full((len(scored),), float(np.interp(ratio, gammas, grid)), np.float32)
    logits = apply(params, batch["tokens"], is_masked, batch["valid"], t, inputs)
    hit = (np.asarray(logits).argmax(-1) == batch["tokens"]) & is_masked
    out[f"r{ratio}"] = float(hit.sum() / max(is_masked.sum(), 1))
  return out


def corrupted_signal(task: str, element: dict) -> np.ndarray:
  """The corrupted input alone: SE noisy mix, TSE mixture (after the prompt audio), VC perturbed source."""
  if task == "vc":
    return element["parts"]["source"]
  start = tasks.SAMPLES_PER_TOKEN * element["prompt_length"]
  return element["cond_audio"][start:]


def tokenize_rows(tokenizer, waves: list[np.ndarray]) -> np.ndarray:
  """Tokens `[B, frames]` of 16 kHz waveforms of different lengths (one padded batch)."""
  lengths = np.array([len(w) for w in waves], np.int32)
  padded = np.zeros((len(waves), int(lengths.max())), np.float32)
  for r, w in enumerate(waves):
    padded[r, :len(w)] = w
  toks, _ = tokenizer.tokenize(padded, lengths)
  return np.asarray(toks)


def trivial_scores(task: str, elements: list[dict], batch, tokenizer) -> dict[str, float]:
  """Accuracy of the corrupted input's tokens, alone and behind the prompt audio (module doc)."""
  p, n = batch["prompt_lengths"], batch["valid"].sum(-1)
  alone = tokenize_rows(tokenizer, [corrupted_signal(task, e) for e in elements])
  whole = tokenize_rows(tokenizer, [e["cond_audio"] for e in elements])
  out = {}
  for name, toks, offset in (("trivial", alone, np.zeros_like(p)), ("trivial_with_prompt", whole, p)):
    predicted = np.full_like(batch["tokens"], -1)
    for r in range(len(elements)):
      m = min(n[r] - p[r], toks.shape[1] - offset[r])
      predicted[r, p[r]:p[r] + m] = toks[r, offset[r]:offset[r] + m]
    out[name] = accuracy(predicted, batch)
  return out


def score(config, setup, params, base, tokenizer, seeds: int) -> dict:
  """The module doc's measurements of one fine-tune."""
  task = config.finetune.task
  elements = heldout_elements(config, seeds)
  batch = collate(config, elements)
  model = metis.MetisModel(metis.MetisConfig.from_config(finetune_export.decode_model_config(config.model)))
  base_model = metis.MetisModel(metis.MetisConfig.from_config(base.model))
  schedule = setup.masking.schedule
  scored = target_mask(batch)
  majority = majority_token(config)
  res = {"rows": len(elements), "tokens": int(scored.sum()),
         "majority": accuracy(np.full_like(batch["tokens"], majority), batch)}
  masked = {}
  if task == "tts":
    phones = {"phones": batch["phones"], "phone_valid": batch["phone_valid"]}
    masked["finetuned"] = masked_accuracies(model, params, batch, schedule, **phones)
    masked["finetuned_no_phones"] = masked_accuracies(model, params, batch, schedule, phones=batch["phones"],
                                                      phone_valid=np.zeros_like(batch["phone_valid"]))
  else:
    features = np.asarray(fto.condition_features(setup, None, batch))
    defaults = inference_tasks.DECODE_DEFAULTS[task]
    res["decode"] = f"{defaults.steps} steps cfg {defaults.cfg}"
    res["finetuned"] = accuracy(decoded_tokens(model, params, batch, defaults.steps, defaults.cfg, features), batch)
    res["base"] = accuracy(decoded_tokens(base_model, base.params, batch, defaults.steps, defaults.cfg), batch)
    if task in fto.AUDIO_TASKS:
      res.update(trivial_scores(task, elements, batch, tokenizer))
    masked["finetuned"] = masked_accuracies(model, params, batch, schedule, features=features)
  masked["base"] = masked_accuracies(base_model, base.params, batch, schedule)
  res["masked"] = masked
  return res


# ----------------------------------------------------------------------------- runs


def losses(workdir: str) -> dict[str, float]:
  """Mean training loss of the first and last 10 steps (metrics.jsonl, the latest record of each step)."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      m = json.loads(line)
      if "loss" in m:
        by_step[int(m["step"])] = float(m["loss"])
  steps = sorted(by_step)
  return {"loss_first10": float(np.mean([by_step[s] for s in steps[:10]])),
          "loss_last10": float(np.mean([by_step[s] for s in steps[-10:]])), "steps": steps[-1] if steps else 0}


def run_task(task: str, args) -> dict:
  overrides = [f"finetune.base={args.base}", f"train.steps={args.steps}", "finetune.export=False"]
  if args.learning_rate:
    overrides.append(f"train.learning_rate={args.learning_rate}")
  config = config_lib.load_config(f"configs/finetune_tiny.py:{task}", overrides)
  workdir = os.path.join(args.out, task)
  result = loop.train(config, workdir, return_state=True)
  objective = fto.FinetuneObjective(config)
  prepared = objective.prepare(config, workdir)
  cfg = metis.MetisConfig.from_config(config.model)
  params = jax.tree_util.tree_map(np.asarray, lora_lib.merge_lora(objective.full_params(result.state), cfg.lora))
  base = finetune_base.load_base(args.base, config.model)
  tokenizer = tk.load_tokenizer(os.path.join(args.base, "demo_data", "tokenizer"))
  res = score(prepared, objective.setup, params, base, tokenizer, args.eval_seeds)
  res.update(losses(workdir))
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base", required=True, help="the default job's workdir (the tiny base and its demo data)")
  ap.add_argument("--out", required=True, help="one fine-tune workdir per task under it")
  ap.add_argument("--tasks", default="se,tse,vc,tts,l2s")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--learning_rate", type=float, default=0.0, help="0: the config's")
  ap.add_argument("--eval_seeds", type=int, default=3, help="draws of every held-out target")
  args = ap.parse_args()
  results = {}
  for task in args.tasks.split(","):
    if task not in DECODED_TASKS + ("tts",):
      raise SystemExit(f"error: --tasks: {task!r} is not one of {DECODED_TASKS + ('tts',)}")
    results[task] = run_task(task, args)
    print(task, json.dumps(results[task]), flush=True)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  sys.exit(main())
