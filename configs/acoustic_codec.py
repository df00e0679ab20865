"""The acoustic codec: the released size (default) and 'tiny', big_vision style.

  (default)  DAC encoder (96, strides 3-4-5-8, 256), 12 x 1024 x 8 factorized RVQ, Vocos
             decoder (512, 4096, 30 layers), iSTFT 1920 / 480. No training recipe is released
             (the GAN is ours, see metis_jax/training/codec_step.py).
  tiny       trains on a laptop CPU (tests, smoke runs, the codec figure): same hop (480 at
             24 kHz), same 12-layer factorized RVQ and iSTFT head; narrow encoder (8 channels),
             4 Vocos layers of width 64, small discriminators (MPD widths 8-64, spectrogram
             discriminators at FFT 128, 512, 2048), 0.5 s crops, no discriminator warm-up; on
             the espeak-ng demo corpus (synthesized under <workdir>/demo_data the first time).
             Also configs/acoustic_codec_tiny.py.

Train on 24 kHz crops of your audio (folders of wav/flac/mp3/ogg, or ArrayRecord shards of
encoded audio):
  python -m metis_jax.train --config configs/acoustic_codec.py --workdir gs://BUCKET/ac \
      --config.data.train_sources='("/data/emilia_wavs",)'
  python -m metis_jax.train --config configs/acoustic_codec.py:tiny --workdir /tmp/codec_tiny
It resumes from the newest checkpoint in the workdir and ends by writing encoder.safetensors
and decoder.safetensors (the released layout) there.
Convert the released weights: metis_jax.conversion.acoustic_codec.load_amphion(encoder, decoder).
"""

from metis_jax import config_base
from metis_jax import config_lib

VARIANTS = ("released", "tiny")


def get_config(variant: str = "released"):
  if variant not in VARIANTS:
    raise config_lib.unknown_variant(__file__, variant, VARIANTS)
  config = config_base.acoustic_codec_config()
  if variant == "tiny":
    return _tiny(config)
  config.train.global_batch_size = 16
  config.train.crop_seconds = 1.0
  # Batch and weights split over all devices (ZeRO-3); the Vocos decoder's
  # matmuls shard over fsdp, the convolutions stay replicated (default rules).
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 5000
  config.logging.log_every_steps = 100
  config.data.num_workers = 8
  return config


def _tiny(config):
  m = config.model
  m.encoder_dim = 8
  m.latent_dim = 32
  m.codebook_size = 256
  m.vocos_dim = 64
  m.vocos_intermediate_dim = 128
  m.vocos_num_layers = 4
  t = config.train
  t.steps = 300
  t.global_batch_size = 4
  t.crop_seconds = 0.5
  # 300 steps on ../shared/data/speech (4 x 0.5 s crops, CPU, lr 2e-4, warmup
  # 20, cosine), codebooks drawn from the first batch (train.codebook_init,
  # the default): mel L1 6.12 (mean of steps 1-10) -> 4.16 (mean of the last
  # 25), about 13 codes per layer in use in a batch of 100 frames at the end.
  # `codec_report --layers 1,4,12` on the 13 files: mel 0.623 / 0.621 / 0.611,
  # and mel_x (against another file's audio) 0.706 / 0.699 / 0.685, so the
  # output follows its input and more layers help. With N(0, 1) codebooks
  # (codebook_init='random') the same run reaches 4.38, but the RVQ collapses
  # to 1 code per layer within ~100 steps and the output ignores its input
  # (mel = mel_x = 0.648 at every depth). On the demo corpus (the default):
  # mel L1 6.09 -> 4.24, about 21 codes per layer in use at the end, and on
  # the (unseen) speech files mel 0.637 against mel_x 0.697 with 12 layers.
  # A usable codec it is not: 300 steps leave SI-SNR far below 0 dB.
  t.learning_rate = 2e-4
  t.warmup_steps = 20
  t.decay = "cosine"
  t.adam_b1 = 0.8
  t.adam_b2 = 0.99
  t.disc_channels = 8
  t.disc_max_channels = 64
  t.mrd_ffts = (128, 512, 2048)
  config.mesh.fsdp = -1
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 25
  config.data.demo_corpus = True
  config.data.num_workers = 0
  return config
