"""Metis base (the released stage-1 size): 1536 wide, 16 layers, 16 heads, 8192 SSL codes.

About 726M parameters without phones (746M with `--config.model.use_phone_cond=True`,
the MaskGCT T2S / Metis TTS layout).

Run:  python -m metis_jax.train --config configs/metis_base.py --workdir gs://BUCKET/metis_base
"""

from metis_jax import config_base


def get_config():
  config = config_base.get_config()
  m = config.model
  m.vocab_size = 8192
  m.hidden_size = 1536
  m.num_layers = 16
  m.num_heads = 16
  m.mlp_ratio = 4
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat_policy = "save_dots_no_batch"
  return config
