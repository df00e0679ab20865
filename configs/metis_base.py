"""Metis base, the released stage-1 size (configs/metis.py:base; fork configs/metis.py).

Run:  python -m metis_jax.train --config configs/metis_base.py --workdir gs://BUCKET/metis_base
Dry run (no TPU needed, libtpu installed):
      python -m metis_jax.train_compile --config configs/metis_base.py --topology v5p-256
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "metis.py", "base")
