"""Tiny Metis: a few minutes on a laptop CPU; for the default job, tests and debugging.

Run:  python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_tiny
"""

from metis_jax import config_base


def get_config():
  config = config_base.get_config()
  m = config.model
  m.vocab_size = 1024
  m.hidden_size = 128
  m.num_layers = 2
  m.num_heads = 4
  m.dtype = "float32"
  m.scan_layers = True
  config.decode.steps = 8
  return config
