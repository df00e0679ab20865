"""The acoustic codec at the released size: DAC encoder (96, strides 3-4-5-8, 256),
12 x 1024 x 8 factorized RVQ, Vocos decoder (512, 4096, 30 layers), iSTFT 1920 / 480.

Train (GAN; no recipe is released, see metis_jax/codec_train_step.py) on 24 kHz crops of
your audio (folders of wav/flac/mp3/ogg, or ArrayRecord shards of encoded audio):
  python -m metis_jax.codec_train --config configs/acoustic_codec.py --workdir gs://BUCKET/ac \
      --config.data.train_sources='("/data/emilia_wavs",)'
It resumes from the newest checkpoint in the workdir and ends by writing encoder.safetensors
and decoder.safetensors (the released layout) there.
Convert the released weights: metis_jax.conversion.acoustic_codec.load_amphion(encoder, decoder).
"""

from metis_jax.training import codec_config


def get_config():
  config = codec_config.acoustic_config()
  config.train.global_batch_size = 16
  config.train.crop_seconds = 1.0
  # Batch and weights split over all devices (ZeRO-3); the Vocos decoder's
  # matmuls shard over fsdp, the convolutions stay replicated (default rules).
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 5000
  config.logging.log_every_steps = 100
  config.data.num_workers = 8
  return config
