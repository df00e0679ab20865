"""S2A 1-layer (the released size): SSL tokens -> acoustic codec layer 0.

configs/s2a_full.py (1024 wide, 16 layers, 16 heads, SwiGLU 4096, 1024 codes,
8192 SSL codes, same training settings) with one codec layer, which it
predicts. About 330M parameters, as the released `s2a_model_1layer.safetensors`.

Run (records with acoustic tokens; only their layer 0 is read):
  python -m metis_jax.train --config configs/s2a_1layer.py --workdir gs://BUCKET/s2a_1layer \
      --config.data.train_sources='("gs://BUCKET/shards/emilia",)'
Dry run:  python -m metis_jax.train_compile --config configs/s2a_1layer.py --topology v5p-128
"""

import importlib.util
import os


def _base():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s2a_full.py")
  spec = importlib.util.spec_from_file_location("s2a_full_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _base()
  config.model.num_quantizers = 1
  config.model.predicts_first_layer = True
  # Released: 40 steps, no guidance for the 1-layer model.
  config.decode.s2a_steps = (40,)
  config.decode.s2a_cfg = 0.0
  return config
