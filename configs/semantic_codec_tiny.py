"""A tiny semantic codec (configs/semantic_codec.py:tiny) for tests and smoke runs on a CPU.

  python -m metis_jax.codec_train --config configs/semantic_codec_tiny.py --workdir /tmp/sem_tiny
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "semantic_codec.py", "tiny")
