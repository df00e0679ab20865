"""Tiny fine-tunes of the default job's tiny base on the demo corpus: a few CPU minutes each.

  se | tse | vc   LoRA r 8 (alpha 16) + adapter on the cheap 160-d condition features
                  (log-mel pairs at 50 Hz, `data.condition_features`; the released models use
                  w2v-BERT layer 17, which is too large for a laptop)
  tts             LoRA r 8 + a new phone prefix (the demo's espeak phones)
  l2s             every weight, ungated adapter on the demo's stand-in 768-d visual features
  omni            every weight, phones + adapter (cheap features), se/tse/vc/tts mixed

The tiny adapters are ungated (as the released L2S one). Measured on the demo: with the
released zero-initialized gate, the gate of an SE fine-tune was still 0.004 after 300 steps
(held-out accuracy with and without the features identical), while the ungated adapter took
the training loss from 6.12 to 4.91 and the accuracy from 0.02 to 0.15 in 150 steps. A scalar
gate at 0 is a saddle that a few hundred steps do not leave; `--config.model.adapter_gated=True`
restores the released layout (base + LoRA + adapter files at export).

Run (the base: the default job, `python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_tiny`):
  python -m metis_jax.train --config configs/finetune_tiny.py:se --workdir /tmp/ft_se \
      --config.finetune.base=/tmp/metis_tiny
The task data is built beside the base's demo corpus (`<base>/demo_data/tasks`: shards with
source paths and phones, synthetic noise and room responses, visual features); the last
sentence of every voice is held out of training.
"""

import os

from metis_jax import config_base
from metis_jax import config_lib

TASKS = ("se", "tse", "vc", "tts", "l2s", "omni")
# Model fields of the tiny base (configs/metis.py:tiny) that a fine-tune must share.
_BASE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio", "dtype", "scan_layers")


def get_config(task: str = "se"):
  if task not in TASKS:
    raise config_lib.unknown_variant(__file__, task, TASKS)
  base = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "metis.py:tiny"))
  config = config_base.finetune_run_config()
  for key in _BASE_FIELDS:
    config.model[key] = base.model[key]
  config.data = base.data
  config.mesh = base.mesh
  config.decode = base.decode
  m, f = config.model, config.finetune
  m.cond_feature = "cheap"
  f.task = task
  if task in ("se", "tse", "vc", "tts"):
    m.lora_rank, m.lora_alpha, m.lora_dropout = 8, 16.0, 0.01
  if task in ("se", "tse", "vc"):
    m.cond_feature_dim, m.adapter_gated = 160, False
    f.trainable = "lora+adapter"
  elif task == "tts":
    m.use_phone_cond = True
    f.trainable = "lora+phones"
  elif task == "l2s":
    m.cond_feature_dim, m.adapter_gated = 768, False
    f.trainable = "full"
  else:
    m.use_phone_cond = True
    m.cond_feature_dim, m.adapter_gated = 160, False
    f.trainable = "full"
  t = config.train
  t.steps = 300
  t.global_batch_size = 16
  t.seq_length = 256 if task in ("tts", "omni") else 128
  full = f.trainable == "full"
  t.learning_rate = 1e-3 if full else 3e-3
  t.warmup_steps = 30
  t.synthetic_data = False
  f.prompt_tokens = (10, 40)
  f.phone_length = 192
  config.data.bucket_lengths = (t.seq_length,)
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 25
  return config
