"""Metis L2S fine-tune at the released size (configs/metis_finetune.py:l2s); the base is a flag.

Run:  python -m metis_jax.train --config configs/metis_l2s.py --workdir gs://BUCKET/metis_l2s \
          --config.finetune.base=metis_base/model.safetensors --config.data.train_sources='("gs://BUCKET/shards",)'
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "metis_finetune.py", "l2s")
