"""Tiny S2A (configs/s2a.py:tiny): codec layers 1..11 given layer 0, minutes on a laptop CPU.

Run:  python -m metis_jax.train --config configs/s2a_tiny.py --workdir /tmp/s2a_tiny
      python -m metis_jax.train_eval --config configs/s2a_tiny.py --workdir /tmp/s2a_tiny
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "s2a.py", "tiny")
