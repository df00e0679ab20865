"""S2A full (the released size): SSL tokens -> acoustic codec layers 1..11, given layer 0.

1024 wide, 16 layers, 16 heads (head_dim 64), SwiGLU 4096, 12 codec layers of
1024 codes, conditioned on 8192 SSL codes; predicts layers 1..11 (layer 0
comes from the 1-layer model, configs/s2a_1layer.py). About 353M parameters,
as the released `s2a_model_full.safetensors`.

Run (shards written by `python -m metis_jax.data.tokenize` with
`--config.data.acoustic_codec_encoder/decoder` set, so records carry acoustic tokens):
  python -m metis_jax.train --config configs/s2a_full.py --workdir gs://BUCKET/s2a_full \
      --config.data.train_sources='("gs://BUCKET/shards/emilia",)'
Dry run (no TPU needed, libtpu installed):
  python -m metis_jax.train_compile --config configs/s2a_full.py --topology v5p-128
"""

from metis_jax import config_base


def get_config():
  config = config_base.get_config()
  m = config.model
  m.kind = "s2a"
  m.vocab_size = 1024           # acoustic codebook
  m.cond_vocab_size = 8192      # SSL tokens
  m.num_quantizers = 12
  m.predicts_first_layer = False
  m.layer_schedule = "linear"   # weights 12..2 over layers 1..11, as released
  m.hidden_size = 1024
  m.num_layers = 16
  m.num_heads = 16
  m.mlp_ratio = 4
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat_policy = "save_dots_no_batch"

  # No 0.2 clamp of the mask ratio; prompts up to half the utterance.
  config.masking = config_base.s2a_masking_config()
  config.decode.s2a_steps = (40, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
  config.decode.s2a_cfg = 2.5

  t = config.train
  # No S2A recipe is released; these follow configs/metis_base.py (the same
  # 50 Hz frame rate, so 1024 frames = 20.5 s crops, 262k frames per step).
  t.seq_length = 1024
  t.global_batch_size = 256
  t.steps = 400_000
  t.learning_rate = 1e-4
  t.warmup_steps = 10_000
  t.decay = "cosine"
  t.end_learning_rate_ratio = 0.1
  t.grad_clip_norm = 1.0
  t.weight_decay = 0.01

  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.mesh.dcn_data = -1

  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3
  config.checkpoint.keep_period = 50_000
  config.logging.log_every_steps = 50
  return config
