"""Small shared helpers for tests: tiny models with informative random weights."""

import jax
import numpy as np

from metis_jax import config_lib
from metis_jax.models import metis


def tiny_model_config(**overrides):
  model = config_lib.load_config("tiny").model
  model.hidden_size, model.num_layers, model.num_heads, model.vocab_size = 64, 2, 4, 128
  model.dtype = "float32"
  for k, v in overrides.items():
    model[k] = v
  return model


def random_params(model: metis.MetisModel, seed: int = 0):
  """Parameters drawn like the parity fixtures: N(0, 1/fan_in) matrices, N(0, 1)
  embeddings, norm gains 1 + N(0, 0.01) (so outputs vary by position)."""
  params = metis.init_params(model, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  hidden = model.config.hidden_size

  def draw(path, x):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if "to_weight" in name and name.endswith("bias"):
      return (1 + 0.01 * rng.standard_normal(x.shape)).astype(np.float32)
    if "to_weight" in name:
      return (0.01 * rng.standard_normal(x.shape)).astype(np.float32)
    if x.ndim >= 2 and "embed" not in name:
      fan_in = 4 * hidden if "down" in name or "fc2" in name else hidden
      return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
    if name.endswith("bias"):
      return (0.01 * rng.standard_normal(x.shape)).astype(np.float32)
    return rng.standard_normal(x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, params)


def tiny_model(seed: int = 0, **overrides):
  cfg = tiny_model_config(**overrides)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  return cfg, model, random_params(model, seed)
