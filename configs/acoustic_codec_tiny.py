"""A tiny acoustic codec (configs/acoustic_codec.py:tiny) that trains on a laptop CPU.

  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py --workdir /tmp/codec_tiny
or on real speech:
  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py --workdir /tmp/codec_tiny \
      --config.data.train_sources='("../shared/data/speech",)'
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "acoustic_codec.py", "tiny")
