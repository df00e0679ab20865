"""Metis base (the released stage-1 size): 1536 wide, 16 layers, 16 heads, 8192 SSL codes.

About 726M parameters without phones (746M with `--config.model.use_phone_cond=True`,
the MaskGCT T2S / Metis TTS layout).

Run:  python -m metis_jax.train --config configs/metis_base.py --workdir gs://BUCKET/metis_base
Dry run (no TPU needed, libtpu installed):
      python -m metis_jax.train_compile --config configs/metis_base.py --topology v5p-256
"""

from metis_jax import config_base


def get_config():
  config = config_base.get_config()
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

  t = config.train
  # 30 s crops at 50 Hz would be 1500 tokens; most utterances of the large
  # speech corpora (Emilia, Libri-Light segments) are 3-20 s, so 1024 tokens
  # (20.5 s) covers nearly all of them with little padding, and 1024 is a
  # multiple of the 128/256 MXU tiles. Attention is O(T^2) but at T = 1024
  # and H = 1536 it is only ~8% of the FLOPs (2TH vs 4H^2 + 3HM per layer).
  t.seq_length = 1024
  # 256 x 1024 = 262k tokens per step (about 87 minutes of audio): the usual
  # range for a 0.7B transformer (GPT-3 used 0.5M tokens at 760M); on a
  # 128-chip slice it is 2 sequences per chip, enough to keep the MXUs busy
  # with fsdp.
  t.global_batch_size = 256
  # 1e-4 is the AdamW peak MaskGCT reports (with a 32k-step warmup and an
  # inverse-sqrt decay, as we read the paper); we keep the peak, warm up over
  # 10k steps and decay (cosine) to 10% over 400k steps: ~105B tokens, ~6
  # epochs of a 100k-hour corpus at 50 tokens/s.
  t.steps = 400_000
  t.learning_rate = 1e-4
  t.warmup_steps = 10_000
  t.decay = "cosine"
  t.end_learning_rate_ratio = 0.1
  t.grad_clip_norm = 1.0
  t.weight_decay = 0.01

  # ZeRO-3 over every chip of the slice: 726M params x 16 bytes (fp32 weights,
  # Adam moments, gradients) = 11.6 GB, i.e. ~90 MB per chip on 128 chips;
  # activations (remat: matmul outputs only) dominate. Data parallel across
  # slices.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  config.mesh.dcn_data = -1

  config.checkpoint.every_steps = 2000
  config.checkpoint.keep = 3
  config.checkpoint.keep_period = 50_000
  config.logging.log_every_steps = 50
  return config
