"""S2A (SSL tokens -> acoustic codec tokens): the released 'full' size (default) and its variants.

  full         predicts codec layers 1..11 given layer 0: 1024 wide, 16 layers, 16 heads
               (head_dim 64), SwiGLU 4096, 12 codec layers of 1024 codes, conditioned on 8192
               SSL codes. About 353M parameters, as the released `s2a_model_full.safetensors`.
               Also configs/s2a_full.py.
  1layer       full with one codec layer, which it predicts (layer 0). About 330M parameters,
               as the released `s2a_model_1layer.safetensors`. Also configs/s2a_1layer.py.
  tiny         full's layout at laptop size (minutes on a CPU) on the built-in demo corpus:
               SSL tokens from a k-means tokenizer fitted on it, and 12 layers of acoustic
               tokens from a residual k-means of 24 kHz log-mel frames, also fitted on it (not a
               neural codec, whose weights are not available offline; see
               metis_jax/data/demo.py). The last sentence of every voice is held out for
               train_eval. Also configs/s2a_tiny.py.
  tiny_1layer  tiny with one codec layer, which it predicts. Also configs/s2a_tiny_1layer.py.

Run (shards written by `python -m metis_jax.data.tokenize` with
`--config.data.acoustic_codec_encoder/decoder` set, so records carry acoustic tokens):
  python -m metis_jax.train --config configs/s2a.py:full --workdir gs://BUCKET/s2a_full \
      --config.data.train_sources='("gs://BUCKET/shards/emilia",)'
Dry run (no TPU needed, libtpu installed):
  python -m metis_jax.train_compile --config configs/s2a.py:1layer --topology v5p-128
Laptop, then held-out masked accuracy (and its chance and majority baselines):
  python -m metis_jax.train --config configs/s2a.py:tiny --workdir /tmp/s2a_tiny
  python -m metis_jax.train_eval --config configs/s2a.py:tiny --workdir /tmp/s2a_tiny
"""

from metis_jax import config_base
from metis_jax import config_lib

VARIANTS = ("full", "1layer", "tiny", "tiny_1layer")


def get_config(variant: str = "full"):
  if variant not in VARIANTS:
    raise config_lib.unknown_variant(__file__, variant, VARIANTS)
  config = config_base.get_config()
  config.model.kind = "s2a"
  # No 0.2 clamp of the mask ratio; prompts up to half the utterance.
  config.masking = config_base.s2a_masking_config()
  if variant.startswith("tiny"):
    _tiny(config)
  else:
    _full(config)
  if variant.endswith("1layer"):
    _one_layer(config, tiny=variant.startswith("tiny"))
  return config


def _full(config):
  m = config.model
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

  config.decode.s2a_steps = (40, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
  config.decode.s2a_cfg = 2.5

  t = config.train
  # No S2A recipe is released; these follow configs/metis.py:base (the same
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


def _tiny(config):
  m = config.model
  m.vocab_size = 256            # codebook of the demo's acoustic tokens (fitted to this size)
  m.cond_vocab_size = 1024      # k-means SSL tokens (data.kmeans_clusters)
  m.num_quantizers = 12
  m.predicts_first_layer = False
  # Narrower than configs/metis.py:tiny: at 64 wide the codec layers are learnt
  # about twice as fast per step on the demo corpus as at 128.
  m.hidden_size = 64
  m.num_layers = 2
  m.num_heads = 4
  m.dtype = "float32"
  m.scan_layers = True
  config.decode.s2a_steps = (8, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)

  t = config.train
  # 11 codec layers share the steps (one per batch): about 2 minutes on a laptop CPU.
  t.steps = 1000
  t.global_batch_size = 16
  t.seq_length = 128
  t.learning_rate = 2e-3
  t.warmup_steps = 50
  t.synthetic_data = False

  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 250
  config.logging.log_every_steps = 50

  config.data.kmeans_clusters = m.cond_vocab_size
  config.data.kmeans_max_frames = 100_000
  config.data.min_length = 25
  config.data.num_workers = 0
  config.data.demo_corpus = True
  config.data.bucket_lengths = (t.seq_length,)


def _one_layer(config, tiny: bool):
  """One codec layer, which the model predicts; only layer 0 of the acoustic tokens is read."""
  config.model.num_quantizers = 1
  config.model.predicts_first_layer = True
  if not tiny:
    # Released: 40 steps, no guidance for the 1-layer model.
    config.decode.s2a_steps = (40,)
    config.decode.s2a_cfg = 0.0
    return
  # One layer to learn: 300 steps (under a minute on a laptop CPU) suffice.
  config.train.steps = 300
  config.train.warmup_steps = 30
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 25
  config.decode.s2a_steps = (8,)
  config.decode.s2a_cfg = 0.0
