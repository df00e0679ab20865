"""The acoustic codec at the released size: DAC encoder (96, strides 3-4-5-8, 256),
12 x 1024 x 8 factorized RVQ, Vocos decoder (512, 4096, 30 layers), iSTFT 1920 / 480.

Train (GAN; no recipe is released, see metis_jax/codec_train.py):
  python -m metis_jax.codec_train --config configs/acoustic_codec.py --wav_dir DIR --workdir /tmp/ac
Convert the released weights: metis_jax.conversion.acoustic_codec.load_amphion(encoder, decoder).
"""

from metis_jax import acoustic_codec


def get_config():
  return acoustic_codec.default_config()
