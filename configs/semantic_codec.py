"""The semantic codec (RepCodec) at the released size: 8192 x 8 codebook, 12 + 12 Vocos layers.

Train on normalized w2v-BERT 2.0 layer-17 features, computed inside the train step from
16 kHz crops of your audio with the frozen encoder (reconstruction loss L1 + MSE, our decision):
  python -m metis_jax.codec_train --config configs/semantic_codec.py --workdir /tmp/semantic_codec \
      --config.features.w2v_bert_weights=/ckpt/w2v-bert-2.0/model.safetensors \
      --config.features.w2v_bert_stats=/ckpt/w2v_stats.npz \
      --config.data.train_sources='("/data/emilia_wavs",)'
`--config.features.source=synthetic` trains on synthetic feature-like frames instead (no audio).
Ends by writing <workdir>/semantic_codec.safetensors (the released layout).
Convert the released weights: metis_jax.conversion.semantic_codec.load_amphion(path).
"""

from metis_jax.training import codec_config


def get_config():
  config = codec_config.semantic_config()
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 5000
  config.logging.log_every_steps = 100
  config.data.num_workers = 8
  # bf16 encoder on accelerators (the features are normalized in float32).
  config.features.dtype = "bfloat16"
  return config
