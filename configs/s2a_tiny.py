"""Tiny S2A (full model: predicts codec layers 1..11 given layer 0): minutes on a laptop CPU.

Run:  python -m metis_jax.train --config configs/s2a_tiny.py --workdir /tmp/s2a_tiny
Held-out masked accuracy of the result (and its chance and majority baselines):
      python -m metis_jax.train_eval --config configs/s2a_tiny.py --workdir /tmp/s2a_tiny

It trains on the built-in demo corpus (espeak-ng speech, under
<workdir>/demo_data): SSL tokens from a k-means tokenizer fitted on it, and
12 layers of acoustic tokens from a residual k-means of 24 kHz log-mel
frames, also fitted on it: not a neural codec, whose weights are not
available offline (see metis_jax/data/demo.py). The last sentence of every
voice is held out for train_eval. `--config.train.synthetic_data=True`
trains on synthetic tokens instead.
"""

from metis_jax import config_base


def get_config():
  config = config_base.get_config()
  m = config.model
  m.kind = "s2a"
  m.vocab_size = 256            # codebook of the demo's acoustic tokens (fitted to this size)
  m.cond_vocab_size = 1024      # k-means SSL tokens (data.kmeans_clusters)
  m.num_quantizers = 12
  m.predicts_first_layer = False
  # Narrower than configs/tiny.py: at 64 wide the codec layers are learnt
  # about twice as fast per step on the demo corpus as at 128.
  m.hidden_size = 64
  m.num_layers = 2
  m.num_heads = 4
  m.dtype = "float32"
  m.scan_layers = True
  config.masking = config_base.s2a_masking_config()
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
  return config
