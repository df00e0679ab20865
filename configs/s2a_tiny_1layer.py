"""Tiny S2A 1-layer (configs/s2a.py:tiny_1layer): codec layer 0 from SSL tokens, on a laptop CPU.

Run:  python -m metis_jax.train --config configs/s2a_tiny_1layer.py --workdir /tmp/s2a_tiny_1layer
      python -m metis_jax.train_eval --config configs/s2a_tiny_1layer.py --workdir /tmp/s2a_tiny_1layer
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "s2a.py", "tiny_1layer")
