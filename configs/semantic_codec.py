"""The semantic codec (RepCodec): the released size (default) and 'tiny', big_vision style.

  (default)  8192 x 8 codebook, 12 + 12 Vocos layers; trains on normalized w2v-BERT 2.0
             layer-17 features, computed inside the train step from 16 kHz crops of your audio
             with the frozen encoder (reconstruction loss L1 + MSE, our decision).
  tiny       for tests and smoke runs on a CPU: 256 x 8 codebook, width 64, 2 + 2 Vocos
             layers of width 32. Its input features come from a RANDOMLY INITIALIZED 2-block
             w2v-BERT of width 64, computed inside the train step from 16 kHz crops of the
             espeak-ng demo corpus: they are not SSL features (a random encoder has no phonetic
             content), so this run checks the machinery (audio -> features -> codes ->
             reconstruction, restarts, checkpoints), not codec quality.
             Also configs/semantic_codec_tiny.py.

  python -m metis_jax.train --config configs/semantic_codec.py --workdir /tmp/semantic_codec \
      --config.features.w2v_bert_weights=/ckpt/w2v-bert-2.0/model.safetensors \
      --config.features.w2v_bert_stats=/ckpt/w2v_stats.npz \
      --config.data.train_sources='("/data/emilia_wavs",)'
  python -m metis_jax.train --config configs/semantic_codec.py:tiny --workdir /tmp/sem_tiny
`--config.features.source=synthetic` trains on synthetic feature-like frames instead (no audio).
Ends by writing <workdir>/semantic_codec.safetensors (the released layout).
Convert the released weights: metis_jax.conversion.semantic_codec.load_amphion(path).
"""

from metis_jax import config_base
from metis_jax import config_lib

VARIANTS = ("released", "tiny")


def get_config(variant: str = "released"):
  if variant not in VARIANTS:
    raise config_lib.unknown_variant(__file__, variant, VARIANTS)
  config = config_base.semantic_codec_config()
  if variant == "tiny":
    return _tiny(config)
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 5000
  config.logging.log_every_steps = 100
  config.data.num_workers = 8
  # bf16 encoder on accelerators (the features are normalized in float32).
  config.features.dtype = "bfloat16"
  return config


def _tiny(config):
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
