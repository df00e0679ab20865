"""A tiny acoustic codec that trains on a laptop CPU (tests, smoke runs, the codec figure).

Same hop (480 at 24 kHz), same 12-layer factorized RVQ and iSTFT head as the
released model; narrow encoder (8 channels), 4 Vocos layers of width 64,
small discriminators (MPD widths 8-64, spectrogram discriminators at FFT 128,
512, 2048), 0.5 s crops, no discriminator warm-up. Trains on the espeak-ng
demo corpus (synthesized under <workdir>/demo_data the first time):
  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py --workdir /tmp/codec_tiny
or on real speech:
  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py --workdir /tmp/codec_tiny \
      --config.data.train_sources='("../shared/data/speech",)'
"""

from metis_jax import codec_config


def get_config():
  config = codec_config.acoustic_config()
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
  # 300 steps on ../shared/data/speech (4 x 0.5 s crops): mel L1 6.1 (mean of
  # steps 1-10) -> 4.38 (mean of the last 25) at 2e-4, 4.57 at 2e-3 (warmup 20,
  # cosine); ~4.4-4.6 at a constant 1e-3. At every rate the RVQ collapses to 1-2
  # codes per layer within ~100 steps (see metis_jax/codec_train_step.py): this
  # drop is the decoder learning an input-independent output (codec_report
  # gives the same mel distance from 1 layer as from 12), not yet a codec.
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
