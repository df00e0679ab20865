"""S2A full, the released size (configs/s2a.py:full; fork configs/s2a.py).

Run:  python -m metis_jax.train --config configs/s2a_full.py --workdir gs://BUCKET/s2a_full \
      --config.data.train_sources='("gs://BUCKET/shards/emilia",)'
Dry run:  python -m metis_jax.train_compile --config configs/s2a_full.py --topology v5p-128
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "s2a.py", "full")
