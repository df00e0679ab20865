"""A tiny acoustic codec that trains on a laptop CPU (tests, smoke runs).

Same hop (480 at 24 kHz), same 12-layer factorized RVQ and iSTFT head as the
released model; narrow encoder (8 channels), 4 Vocos layers of width 64,
small discriminators (MPD widths 8-64, spectrogram discriminators at FFT 128,
512, 2048), 0.5 s crops, no discriminator warm-up.

  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py \
      --wav_dir ../shared/data/speech --workdir /tmp/codec_tiny --steps 300
"""

from metis_jax import acoustic_codec


def get_config():
  config = acoustic_codec.default_config()
  m = config.model
  m.encoder_dim = 8
  m.latent_dim = 32
  m.codebook_size = 256
  m.vocos_dim = 64
  m.vocos_intermediate_dim = 128
  m.vocos_num_layers = 4
  t = config.train
  t.batch_size = 4
  t.crop_seconds = 0.5
  t.learning_rate = 1e-3
  t.adam_b1 = 0.8
  t.adam_b2 = 0.99
  t.disc_channels = 8
  t.disc_max_channels = 64
  t.mrd_ffts = (128, 512, 2048)
  return config
