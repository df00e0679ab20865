r"""Demo fine-tunes from the tiny base, scored on held-out demo utterances against two baselines.

  python benchmarks/finetune_demo.py --base /tmp/metis_tiny --out /tmp/ft_demo --tasks se,tse,vc --steps 300

For each task: fine-tune `configs/finetune_tiny.py:<task>` from `--base` (the default
job's workdir), then decode the held-out targets (the last sentence of every demo
voice; `demo.is_heldout`) and report token accuracy against the clean target's
tokens, for
  finetuned   the fine-tuned model (LoRA merged, adapter on the cheap condition features),
              the task's reference decoding settings (SE/TSE 10 steps cfg 0, VC 20 steps cfg 1);
  base        the base model without the condition (prompt only: TSE/VC; nothing: SE),
              the same decoding settings;
  trivial     the tokens of the corrupted input (the noisy mix, the mixture, the perturbed
              source), tokenized by the demo's own tokenizer.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax import config_lib
from metis_jax.data import condition_features
from metis_jax.data import tokenizer as tk
from metis_jax.inference import decoding
from metis_jax.models import metis
from metis_jax.nn import lora as lora_lib
from metis_jax.training import finetune_base
from metis_jax.training import finetune_objective as fto
from metis_jax.training import loop

SETTINGS = {"se": (10, 0.0), "tse": (10, 0.0), "vc": (20, 1.0)}


def _audio_batches(config, batch_size: int = 8):
  from metis_jax.data import tasks  # pylint: disable=import-outside-toplevel
  f = config.finetune
  from metis_jax.data import demo  # pylint: disable=import-outside-toplevel
  return tasks.make_task_iterator(
      f.task, config.data.train_sources[0], fto.task_options(config, features="audio"), batch_size=batch_size,
      seed=1234, num_epochs=1, buckets=(int(config.train.seq_length),), noise_dirs=tuple(f.noise_dirs),
      rir_dirs=tuple(f.rir_dirs), target_filter=demo.is_heldout, pool_filter=lambda i: True)


def score(config, params, model_cfg, base_params, base_cfg, tokenizer):
  task = config.finetune.task
  steps, cfg = SETTINGS[task]
  opts = decoding.DecodeOptions(steps=steps, cfg=cfg)
  ft = decoding.MetisDecoder(metis.MetisModel(metis.MetisConfig.from_config(model_cfg)), opts)
  base = decoding.MetisDecoder(metis.MetisModel(metis.MetisConfig.from_config(base_cfg)), opts)
  hits = {"finetuned": 0, "base": 0, "trivial": 0}
  total = 0
  for batch in _audio_batches(config):
    rows = int((batch["valid"].sum(-1) > 0).sum())
    for r in range(rows):
      n = int(batch["valid"][r].sum())
      p = int(batch["prompt_lengths"][r])
      clean = batch["tokens"][r, p:n]
      t = n - p
      audio = batch["cond_audio"][r, :batch["cond_audio_lengths"][r]]
      feats, _ = condition_features.cheap_condition_features(audio[None], np.array([len(audio)]))
      feats = feats[0][:n]
      prompt = jnp.asarray(batch["tokens"][r:r + 1, :max(p, 1)])
      plen = jnp.array([p], jnp.int32)
      key = jax.random.key(r + 17 * total)
      out = ft(params, key, prompt, plen, jnp.array([t]), target_len=t, features=jnp.asarray(feats[None]))
      hits["finetuned"] += int((np.asarray(out)[0, :t] == clean).sum())
      out = base(base_params, key, prompt, plen, jnp.array([t]), target_len=t)
      hits["base"] += int((np.asarray(out)[0, :t] == clean).sum())
      toks, _ = tokenizer.tokenize(audio[None], np.array([len(audio)]))
      trivial = np.asarray(toks)[0, p:n]
      m = min(len(trivial), t)
      hits["trivial"] += int((trivial[:m] == clean[:m]).sum())
      total += t
  return {k: v / max(total, 1) for k, v in hits.items()} | {"tokens": total}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--base", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--tasks", default="se,tse,vc")
  ap.add_argument("--steps", type=int, default=300)
  args = ap.parse_args()
  results = {}
  for task in args.tasks.split(","):
    config = config_lib.load_config(f"configs/finetune_tiny.py:{task}",
                                    [f"finetune.base={args.base}", f"train.steps={args.steps}"])
    workdir = os.path.join(args.out, task)
    result = loop.train(config, workdir, return_state=True)
    objective = fto.FinetuneObjective(config)
    prepared = objective.prepare(config, workdir)
    params = objective.full_params(result.state)
    cfg = metis.MetisConfig.from_config(config.model)
    merged = jax.tree_util.tree_map(np.asarray, lora_lib.merge_lora(params, cfg.lora))
    from metis_jax.training import finetune_export  # pylint: disable=import-outside-toplevel
    model_cfg = finetune_export.decode_model_config(config.model)
    base = finetune_base.load_base(args.base, config.model)
    tokenizer = tk.load_tokenizer(os.path.join(args.base, "demo_data", "tokenizer"))
    hist = result.history
    first = np.mean([h["loss"] for h in hist[:10]])
    last = np.mean([h["loss"] for h in hist[-10:]])
    res = score(prepared, merged, model_cfg, base.params, base.model, tokenizer)
    res.update(loss_first10=float(first), loss_last10=float(last), steps=result.final_step)
    results[task] = res
    print(task, json.dumps(res), flush=True)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  sys.exit(main())
