"""Metis fine-tunes at the released size (1536 wide, 16 layers): one variant per task.

  se     speech enhancement: LoRA r 32 (alpha 64, dropout 0.01) + gated adapter on w2v-BERT
         layer-17 features (c 1024); about 18.1M LoRA + 15.7M adapter parameters trained.
  tse    target speaker extraction: as se, with a prompt of the target speaker.
  vc     voice conversion: LoRA r 16 (alpha 32) + gated adapter (c 1024).
  tts    TTS from the base: LoRA r 32 + the phone prefix (phone embedding + phone MLP).
  l2s    lip to speech: every weight trained, ungated adapter on 768-d visual features.
  omni   one model for TTS / SE / TSE / VC: every weight trained, phones + gated adapter (c 1024).

Also configs/metis_{se,tse,vc,tts,l2s,omni}.py. The frozen base is a flag:
  python -m metis_jax.train --config configs/metis_se.py --workdir gs://B/se \
      --config.finetune.base=metis_base/model.safetensors \
      --config.features.w2v_bert_weights=w2v-bert-2.0/model.safetensors \
      --config.features.w2v_bert_stats=w2v_stats.npz \
      --config.data.train_sources='("gs://B/shards",)' --config.finetune.noise_dirs='("/data/dns_noise",)'
(shards tokenized with `--record_sources`, see metis_jax/data/tasks.py; TTS from the MaskGCT
T2S file, whose phone prefix it keeps training). The spec gives the LoRA/adapter shapes of the
released fine-tunes, not their optimizer: the learning rates and schedules below are our choice.
"""

from metis_jax import config_base
from metis_jax import config_lib

TASKS = ("se", "tse", "vc", "tts", "l2s", "omni")


def released_model(config, task: str) -> None:
  """The released fine-tune's model fields for `task` on top of the Metis base sizes."""
  m = config.model
  m.vocab_size = 8192
  m.hidden_size = 1536
  m.num_layers = 16
  m.num_heads = 16
  m.mlp_ratio = 4
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat_policy = "save_dots_no_batch"
  m.cond_feature = "w2v_bert"
  m.lora_dropout = 0.01
  if task in ("se", "tse"):
    m.lora_rank, m.lora_alpha = 32, 64.0
    m.cond_feature_dim, m.adapter_gated = 1024, True
    config.finetune.trainable = "lora+adapter"
  elif task == "vc":
    m.lora_rank, m.lora_alpha = 16, 32.0
    m.cond_feature_dim, m.adapter_gated = 1024, True
    config.finetune.trainable = "lora+adapter"
  elif task == "tts":
    m.lora_rank, m.lora_alpha = 32, 64.0
    m.use_phone_cond = True
    config.finetune.trainable = "lora+phones"
  elif task == "l2s":
    m.lora_rank, m.lora_dropout = 0, 0.0
    m.cond_feature_dim, m.adapter_gated = 768, False
    config.finetune.trainable = "full"
  else:  # omni
    m.lora_rank, m.lora_dropout = 0, 0.0
    m.use_phone_cond = True
    m.cond_feature_dim, m.adapter_gated = 1024, True
    config.finetune.trainable = "full"
  config.finetune.task = task


def get_config(task: str = "se"):
  if task not in TASKS:
    raise config_lib.unknown_variant(__file__, task, TASKS)
  config = config_base.finetune_run_config()
  released_model(config, task)
  t = config.train
  t.seq_length = 1024
  t.global_batch_size = 64
  full = config.finetune.trainable == "full"
  # Adapters and LoRA tolerate a larger rate than the whole network.
  t.learning_rate = 5e-5 if full else 2e-4
  t.steps = 100_000 if full else 50_000
  t.warmup_steps = 1000
  t.decay = "cosine"
  t.end_learning_rate_ratio = 0.1
  t.grad_clip_norm = 1.0
  t.weight_decay = 0.01
  config.finetune.phone_length = 512
  config.data.demo_corpus = False
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.mesh.dcn_data = -1
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 3
  config.logging.log_every_steps = 50
  return config
