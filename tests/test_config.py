"""Config files load, overrides are typed, unknown keys are errors."""

import dataclasses
import glob
import os

import pytest

from metis_jax import config_base
from metis_jax import config_lib
from metis_jax.models import acoustic_codec, metis, s2a, semantic_codec


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


@pytest.mark.parametrize("old, variant", [
    ("tiny", "metis.py:tiny"), ("metis_base", "metis.py:base"), ("metis_base", "metis.py"),
    ("metis_base_v5p256", "metis.py:base_v5p256"), ("s2a_full", "s2a.py"), ("s2a_1layer", "s2a.py:1layer"),
    ("s2a_tiny", "s2a.py:tiny"), ("s2a_tiny_1layer", "s2a.py:tiny_1layer"),
    ("acoustic_codec_tiny", "acoustic_codec.py:tiny"), ("semantic_codec_tiny", "semantic_codec.py:tiny")])
def test_old_config_names_are_variants_of_the_shared_files(old, variant):
  assert config_lib.load_config(old).to_dict() == config_lib.load_config(variant).to_dict()


def test_variants_differ_where_documented():
  full, one = config_lib.load_config("s2a.py:full"), config_lib.load_config("s2a.py:1layer")
  assert (full.model.num_quantizers, one.model.num_quantizers) == (12, 1)
  assert (full.model.predicts_first_layer, one.model.predicts_first_layer) == (False, True)
  assert one.decode.s2a_steps == (40,) and one.decode.s2a_cfg == 0.0
  assert config_lib.load_config("metis.py:base_v5p256").train.global_batch_size == 512
  with pytest.raises(ValueError, match="no variant 'huge'"):
    config_lib.load_config("metis.py:huge")


def _dataclass_defaults(cls):
  return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section, cls, kind", [
    (config_base.acoustic_codec_model_config, acoustic_codec.AcousticCodecConfig, acoustic_codec.KIND),
    (config_base.semantic_codec_model_config, semantic_codec.SemanticCodecConfig, semantic_codec.KIND)])
def test_codec_model_sections_declare_every_field_of_the_model_with_its_default(section, cls, kind):
  declared = section().to_dict()
  assert declared.pop("kind") == kind
  assert {k: tuple(v) if isinstance(v, list) else v for k, v in declared.items()} == _dataclass_defaults(cls)


def test_every_config_shares_the_run_sections_of_config_base():
  base = config_base.get_config()
  for name in ("tiny", "s2a_tiny", "acoustic_codec_tiny", "semantic_codec"):
    config = config_lib.load_config(name)
    for section in ("mesh", "checkpoint", "logging"):
      assert set(config[section].keys()) == set(base[section].keys()), (name, section)
  codec = config_lib.load_config("semantic_codec_tiny")
  assert set(codec.data.keys()) == set(config_base.audio_data_config().keys())
  assert set(codec.features.keys()) == set(config_base.features_config().keys())
