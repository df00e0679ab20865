"""Stage-1 Metis: the released size ('base', the default) and its variants, big_vision style.

  base         1536 wide, 16 layers, 16 heads, 8192 SSL codes: about 726M parameters without
               phones (746M with `--config.model.use_phone_cond=True`, the MaskGCT T2S / Metis
               TTS layout). Also configs/metis_base.py.
  base_v5p256  base on one TPU v5p-256 slice (128 chips). Also configs/metis_base_v5p256.py.
  tiny         a few minutes on a laptop CPU; the default job, tests and debugging. Trains on
               the built-in demo corpus (espeak-ng speech synthesized locally, tokenized by a
               k-means tokenizer fitted on it, all under <workdir>/demo_data, about 15 s the
               first time). `--config.train.synthetic_data=True` trains on synthetic tokens;
               `--config.data.train_sources=...` on your shards. Also configs/tiny.py.

Run:  python -m metis_jax.train --config configs/metis.py:tiny --workdir /tmp/metis_tiny
      python -m metis_jax.train --config configs/metis.py --workdir gs://BUCKET/metis_base
Dry run (no TPU needed, libtpu installed):
      python -m metis_jax.train_compile --config configs/metis.py:base_v5p256 --topology v5p-256
"""

from metis_jax import config_base
from metis_jax import config_lib

VARIANTS = ("base", "base_v5p256", "tiny")


def get_config(variant: str = "base"):
  if variant not in VARIANTS:
    raise config_lib.unknown_variant(__file__, variant, VARIANTS)
  config = config_base.get_config()
  if variant == "tiny":
    return _tiny(config)
  _base(config)
  if variant == "base_v5p256":
    _v5p256(config)
  return config


def _base(config):
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


def _v5p256(config):
  """One TPU v5p-256 slice: 128 chips, 95 GiB HBM each."""
  t = config.train
  # 4 sequences per chip (512 x 1024 = 524k tokens per step): v5p has HBM to
  # spare at this model size, and a larger per-chip batch amortizes the fsdp
  # all-gathers of the weights (which do not grow with the batch). Peak
  # learning rate scaled by sqrt(2) for the doubled batch.
  t.global_batch_size = 512
  t.learning_rate = 1.4e-4
  t.steps = 200_000
  # All 128 chips in one fsdp axis; no tensor parallelism needed at H = 1536.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  # No rematerialization: nothing is recomputed in the backward pass. The AOT
  # dry run (train_compile --topology v5p-256) puts this step at ~15 GiB per
  # chip of 95 GiB ('save_dots_no_batch' needs ~4 GiB but recomputes the
  # elementwise work), so memory is not the constraint here.
  config.model.remat_policy = "none"


def _tiny(config):
  m = config.model
  m.vocab_size = 1024
  m.hidden_size = 128
  m.num_layers = 2
  m.num_heads = 4
  m.dtype = "float32"
  m.scan_layers = True
  config.decode.steps = 8

  t = config.train
  t.steps = 300
  t.global_batch_size = 16
  t.seq_length = 128
  # A small model tolerates (and needs, to learn in 300 steps) a large rate.
  t.learning_rate = 2e-3
  t.warmup_steps = 30
  t.synthetic_data = False

  # All local devices as fsdp (1 on a plain CPU).
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 25

  # Corpus data (with synthetic_data=False): a k-means tokenizer with the tiny
  # vocabulary (`python -m metis_jax.data.fit_kmeans --config configs/tiny.py
  # --input CORPUS --output TOKENIZER`), a short minimum length, and decoding
  # in the main process (no worker start-up cost).
  config.data.kmeans_clusters = m.vocab_size
  config.data.kmeans_max_frames = 100_000
  config.data.min_length = 25
  config.data.num_workers = 0
  config.data.demo_corpus = True
  # One batch shape: the step compiles once.
  config.data.bucket_lengths = (t.seq_length,)
  return config
