"""Tiny Metis (configs/metis.py:tiny): a few minutes on a laptop CPU; the default job.

Run:  python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_tiny
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "metis.py", "tiny")
