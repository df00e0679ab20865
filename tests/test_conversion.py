"""Converter round trips and strict refusal of files that do not match."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from metis_jax import config_lib
from metis_jax.models import metis
from metis_jax.conversion import common, t2s


def _random_params(model_cfg, seed=0):
  model = metis.MetisModel(metis.MetisConfig.from_config(model_cfg))
  params = metis.init_params(model, jax.random.key(seed))
  # Random values everywhere (the zero-initialized norms would hide swaps).
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


@pytest.mark.slow
@pytest.mark.parametrize("phones", [False, True])
@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_exact(phones, scan):
  model_cfg = config_lib.load_config("tiny").model
  model_cfg.use_phone_cond = phones
  model_cfg.scan_layers = scan
  model_cfg.dtype = "float32"
  params = _random_params(model_cfg)
  tensors = t2s.params_to_amphion(params, model_cfg)
  assert ("phone_emb.weight" in tensors) == phones
  assert tensors["diff_estimator.layers.1.self_attn.q_proj.weight"].shape == (128, 128)
  back = t2s.amphion_to_params(tensors, model_cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, back)
  again = t2s.params_to_amphion(back, model_cfg)
  assert set(again) == set(tensors)
  for k in tensors:
    np.testing.assert_array_equal(again[k], tensors[k])


@pytest.mark.slow
def test_file_round_trip_and_inferred_config(tmp_path):
  model_cfg = config_lib.load_config("tiny").model
  model_cfg.use_phone_cond = True
  params = _random_params(model_cfg, seed=1)
  path = str(tmp_path / "t2s.safetensors")
  t2s.save_amphion(path, params, model_cfg)
  loaded_cfg, loaded = t2s.load_amphion(path)
  for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "use_phone_cond", "mlp_ratio"):
    assert loaded_cfg[key] == model_cfg[key], key
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)


@pytest.mark.slow
def test_mismatched_file_is_refused_with_the_bad_keys():
  model_cfg = config_lib.load_config("tiny").model
  tensors = t2s.params_to_amphion(_random_params(model_cfg), model_cfg)
  tensors["cond_emb.weight"] = tensors["cond_emb.weight"][:, :64]
  del tensors["diff_estimator.layers.0.mlp.up_proj.weight"]
  tensors["diff_estimator.layers.7.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)
  with pytest.raises(common.ConversionError) as err:
    t2s.amphion_to_params(tensors, model_cfg, source="bad.safetensors")
  message = str(err.value)
  assert "bad.safetensors" in message
  assert "missing keys (1)" in message and "diff_estimator.layers.0.mlp.up_proj.weight" in message
  assert "unexpected keys (1)" in message and "diff_estimator.layers.7.mlp.up_proj.weight" in message
  assert "mis-shaped keys (1)" in message and "cond_emb.weight: file (1024, 64), model (1024, 128)" in message


def test_phone_file_into_no_phone_config_is_refused():
  model_cfg = config_lib.load_config("tiny").model
  model_cfg.use_phone_cond = True
  tensors = t2s.params_to_amphion(_random_params(model_cfg), model_cfg)
  model_cfg.use_phone_cond = False
  with pytest.raises(common.ConversionError, match="phone_emb.weight"):
    t2s.amphion_to_params(tensors, model_cfg)


@pytest.mark.slow
def test_cli_converts_and_reverses(parity_dir, tmp_path):
  source = os.path.join(parity_dir, "t2s_phones", "weights.safetensors")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "metis_jax.convert", "--input", source,
                  "--output", str(tmp_path / "conv"), "--num_heads", "4"], check=True, env=env,
                 capture_output=True)
  out = tmp_path / "back.safetensors"
  subprocess.run([sys.executable, "-m", "metis_jax.convert", "--reverse", "--input",
                  str(tmp_path / "conv"), "--output", str(out)], check=True, env=env,
                 capture_output=True)
  original, _ = common.load_safetensors(source)
  back, meta = common.load_safetensors(str(out))
  assert set(back) == set(original)
  for k in original:
    np.testing.assert_array_equal(back[k], original[k])
  bad = subprocess.run([sys.executable, "-m", "metis_jax.convert", "--input",
                        os.path.join(parity_dir, "s2a_full", "weights.safetensors"),
                        "--output", str(tmp_path / "bad")], env=env, capture_output=True, text=True)
  assert bad.returncode == 2
  assert "unexpected keys" in bad.stderr and "token_emb.0.weight" in bad.stderr


# ------------------------------------------------------------------ malformed inputs (issue 15)


def _tiny_amphion():
  model_cfg = config_lib.load_config("tiny").model
  model_cfg.dtype = "float32"
  return t2s.params_to_amphion(_random_params(model_cfg, seed=2), model_cfg)


def _malformed(case):
  """(tensors, metadata, num_heads) of one malformed T2S file."""
  tensors, meta, heads = _tiny_amphion(), {}, None
  if case == "rank1_cond_emb":
    tensors["cond_emb.weight"] = tensors["cond_emb.weight"][0]
  elif case == "layer_key_x":
    tensors["diff_estimator.layers.x.mlp.gate_proj.weight"] = tensors["diff_estimator.layers.0.mlp.gate_proj.weight"]
  elif case == "metadata_not_json":
    meta = {"config": "{num_heads: 2"}
  elif case == "metadata_json_list":
    meta = {"config": "[2, 4]"}
  elif case == "heads_do_not_divide":
    heads = 3  # width 128
  elif case == "nan_weights":
    tensors["to_logit.weight"] = np.full_like(tensors["to_logit.weight"], np.nan)
  elif case == "integer_weights":
    tensors["cond_emb.weight"] = tensors["cond_emb.weight"].astype(np.int32)
  return tensors, meta, heads


MALFORMED = {
    "rank1_cond_emb": "cond_emb.weight has shape",
    "layer_key_x": "layer index 'x' is not a number",
    "metadata_not_json": "metadata is not JSON",
    "metadata_json_list": "metadata is a JSON list",
    "heads_do_not_divide": "3 attention heads do not divide the width 128",
    "nan_weights": "hold NaN or Inf (e.g. to_logit.weight)",
    "integer_weights": "not floating point (e.g. cond_emb.weight: int32)",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_is_refused_with_its_reason(tmp_path, case):
  tensors, meta, heads = _malformed(case)
  path = str(tmp_path / "bad.safetensors")
  common.save_safetensors(path, tensors, meta)
  with pytest.raises(common.ConversionError, match=MALFORMED[case].replace("(", r"\(").replace(")", r"\)")) as e:
    t2s.load_amphion(path, heads)
  assert path in str(e.value) or case in ("nan_weights", "integer_weights")


def test_parameters_that_do_not_match_an_edited_config_are_refused():
  model_cfg = config_lib.load_config("tiny").model
  params = _random_params(model_cfg, seed=3)
  edited = model_cfg.copy_and_resolve_references()
  edited.num_layers += 1
  with pytest.raises(common.ConversionError, match="do not match model_config.json"):
    t2s.params_to_amphion(params, edited)
  edited = model_cfg.copy_and_resolve_references()
  edited.hidden_size = 96
  with pytest.raises(common.ConversionError, match="do not match model_config.json"):
    t2s.params_to_amphion(params, edited)


def test_config_metadata_parsing():
  assert common.parse_config_metadata({}, "f") == {}
  assert common.parse_config_metadata({"config": '{"num_heads": 4}'}, "f") == {"num_heads": 4}
  with pytest.raises(common.ConversionError, match="f: its 'config' metadata is a JSON str"):
    common.parse_config_metadata({"config": '"x"'}, "f")
