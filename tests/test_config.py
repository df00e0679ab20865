"""Config files load, overrides are typed, unknown keys are errors."""

import glob
import os

import pytest

from metis_jax import config_lib
from metis_jax.models import metis, s2a


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(config_lib.CONFIG_DIR, "*.py"))))
def test_every_config_file_loads_and_documents_its_command(path):
  config = config_lib.load_config(path)
  if config.model.get("kind") == "metis":
    metis.MetisConfig.from_config(config.model)
  elif config.model.get("kind") == "s2a":
    s2a.S2AConfig.from_config(config.model)
  source = open(path).read()
  assert "python -m metis_jax." in source.split('"""')[1], f"{path}: docstring must give the command"


def test_overrides_are_typed():
  config = config_lib.load_config("tiny", ["config.model.num_layers=3", "model.dtype=bfloat16",
                                           "decode.cfg=1", "model.scan_layers=false"])
  assert config.model.num_layers == 3
  assert config.model.dtype == "bfloat16"
  assert config.decode.cfg == 1.0 and isinstance(config.decode.cfg, float)
  assert config.model.scan_layers is False


@pytest.mark.parametrize("override", ["model.num_layer=3", "modle.num_layers=3", "model.num_layers"])
def test_unknown_or_malformed_override_is_an_error(override):
  with pytest.raises((KeyError, ValueError)):
    config_lib.load_config("tiny", [override])


def test_wrong_type_is_an_error():
  with pytest.raises(ValueError, match="num_layers"):
    config_lib.load_config("tiny", ["model.num_layers=deep"])


def test_base_config_has_released_size():
  config = config_lib.load_config("metis_base")
  import jax
  model = metis.MetisModel(metis.MetisConfig.from_config(config.model))
  shapes = jax.eval_shape(lambda r: metis.init_params(model, r), jax.random.key(0))
  assert round(metis.count_params(shapes) / 1e6, 1) == 725.9
  config.model.use_phone_cond = True
  model = metis.MetisModel(metis.MetisConfig.from_config(config.model))
  shapes = jax.eval_shape(lambda r: metis.init_params(model, r), jax.random.key(0))
  assert round(metis.count_params(shapes) / 1e6, 1) == 746.4
