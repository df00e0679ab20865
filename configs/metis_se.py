"""Metis SE fine-tune at the released size (configs/metis_finetune.py:se); the base is a flag.

Run:  python -m metis_jax.train --config configs/metis_se.py --workdir gs://BUCKET/metis_se \
          --config.finetune.base=metis_base/model.safetensors --config.data.train_sources='("gs://BUCKET/shards",)'
"""

from metis_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "metis_finetune.py", "se")
