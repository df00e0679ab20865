"""Tiny Metis: a few minutes on a laptop CPU; for the default job, tests and debugging.

Run:  python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_tiny

It trains on the built-in demo corpus: espeak-ng speech synthesized locally,
tokenized by a k-means tokenizer fitted on it (all under <workdir>/demo_data,
about 15 s the first time). `--config.train.synthetic_data=True` trains on
synthetic tokens instead; `--config.data.train_sources=...` on your shards.
"""

from metis_jax import config_base


def get_config():
  config = config_base.get_config()
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
