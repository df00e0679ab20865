"""Metis base on one TPU v5p-256 slice (configs/metis.py:base_v5p256).

Run (on every worker, see launch/tpu_pod.sh):
      python -m metis_jax.train --config configs/metis_base_v5p256.py --workdir gs://BUCKET/metis_base
Dry run on a CPU host (libtpu installed):
      python -m metis_jax.train_compile --config configs/metis_base_v5p256.py --topology v5p-256
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "metis.py", "base_v5p256")
