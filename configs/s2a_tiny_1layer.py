"""Tiny S2A 1-layer model (predicts codec layer 0 from SSL tokens): minutes on a laptop CPU.

Run:  python -m metis_jax.train --config configs/s2a_tiny_1layer.py --workdir /tmp/s2a_tiny_1layer

configs/s2a_tiny.py (the same demo corpus) with one codec layer, which it
predicts; only layer 0 of the acoustic tokens is read.
"""

import importlib.util
import os


def _base():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s2a_tiny.py")
  spec = importlib.util.spec_from_file_location("s2a_tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _base()
  config.model.num_quantizers = 1
  config.model.predicts_first_layer = True
  # One layer to learn: 300 steps (under a minute on a laptop CPU) suffice.
  config.train.steps = 300
  config.train.warmup_steps = 30
  config.checkpoint.every_steps = 100
  config.logging.log_every_steps = 25
  config.decode.s2a_steps = (8,)
  config.decode.s2a_cfg = 0.0
  return config
