"""A tiny semantic codec for tests and smoke runs on a CPU.

Codec: 256 x 8 codebook, width 64, 2 + 2 Vocos layers of width 32. Its input
features come from a RANDOMLY INITIALIZED 2-block w2v-BERT of width 64,
computed inside the train step from 16 kHz crops of the espeak-ng demo
corpus: they are not SSL features (a random encoder has no phonetic
content), so this run checks the machinery (audio -> features -> codes ->
reconstruction, restarts, checkpoints), not codec quality.
  python -m metis_jax.codec_train --config configs/semantic_codec_tiny.py --workdir /tmp/sem_tiny
"""

from metis_jax.training import codec_config


def get_config():
  config = codec_config.semantic_config()
  m = config.model
  m.codebook_size = 256
  m.hidden_size = 64
  m.vocos_dim = 32
  m.vocos_intermediate_dim = 64
  m.vocos_num_layers = 2
  f = config.features
  f.source = "random_w2v_bert"
  f.hidden_size = m.hidden_size
  f.num_heads = 4
  f.intermediate_size = 128
  f.output_layer = 2
  f.dtype = "float32"
  t = config.train
  t.steps = 200
  t.global_batch_size = 8
  t.crop_frames = 50  # 1 s
  t.learning_rate = 3e-3
  t.warmup_steps = 10
  t.restart_every = 20
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 20
  config.data.demo_corpus = True
  config.data.num_workers = 0
  return config
