"""Semantic codec (RepCodec): parity with the original, conversion, padding, training."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.models import semantic_codec as sc
from metis_jax.conversion import common
from metis_jax.conversion import semantic_codec as conv


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _fixture(parity_dir):
  d = os.path.join(parity_dir, "semantic_codec")
  return (os.path.join(d, "weights.safetensors"), dict(np.load(os.path.join(d, "inputs.npz"))),
          dict(np.load(os.path.join(d, "outputs.npz"))))


def _fns(model):
  jit = lambda method: jax.jit(functools.partial(model.apply, method=method))
  return (jit(sc.SemanticCodec.quantize), jit(sc.SemanticCodec.embed_codes),
          jit(sc.SemanticCodec.decode))


@pytest.mark.parity
@pytest.mark.parametrize("scan", [False, True])
def test_reproduces_original(parity_dir, scan):
  path, inputs, expected = _fixture(parity_dir)
  cfg, params = conv.load_amphion(path, scan_layers=scan)
  assert (cfg.hidden_size, cfg.vocos_dim, cfg.vocos_num_layers, cfg.codebook_size) == (64, 32, 2, 256)
  quantize, embed, decode = _fns(sc.SemanticCodec(cfg))
  v = {"params": params}
  codes, quantized = quantize(v, jnp.asarray(inputs["feat"]))
  np.testing.assert_array_equal(np.asarray(codes), expected["codes_from_feat"])
  assert _rel(quantized, expected["quantized_emb"]) < 1e-4
  emb = embed(v, jnp.asarray(inputs["codes"]))
  assert _rel(emb, expected["emb_from_codes"]) < 1e-4
  assert _rel(decode(v, emb), expected["feat_rec"]) < 1e-4


def test_padded_batch_equals_items_alone(parity_dir):
  path, inputs, _ = _fixture(parity_dir)
  cfg, params = conv.load_amphion(path)
  quantize, _, decode = _fns(sc.SemanticCodec(cfg))
  v = {"params": params}
  feat = np.array(inputs["feat"])
  feat[0, 20:] = 1e3  # garbage in the padding must not leak
  valid = jnp.arange(30)[None] < jnp.array([[20], [30]])
  codes, q = quantize(v, jnp.asarray(feat), valid)
  alone_codes, alone_q = quantize(v, jnp.asarray(feat[:1, :20]))
  np.testing.assert_array_equal(codes[0, :20], alone_codes[0])
  np.testing.assert_allclose(q[0, :20], alone_q[0], rtol=1e-5, atol=1e-5)
  rec = decode(v, q, valid)
  np.testing.assert_allclose(rec[0, :20], decode(v, alone_q)[0], rtol=1e-4, atol=1e-4)


def _random_params(cfg, seed=0):
  # Shapes from eval_shape (compiling the real initializer is slow on CPU).
  leaves, treedef = jax.tree_util.tree_flatten(sc.abstract_params(sc.SemanticCodec(cfg)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(treedef, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


@pytest.mark.parametrize("weight_norm,scan", [(False, False), (False, True), (True, True)])
def test_conversion_round_trip_is_exact(weight_norm, scan):
  cfg = sc.SemanticCodecConfig(codebook_size=16, hidden_size=12, vocos_dim=8, vocos_intermediate_dim=10,
                               vocos_num_layers=3, weight_norm=weight_norm, scan_layers=scan)
  params = _random_params(cfg)
  tensors = conv.params_to_amphion(params, cfg)
  assert tensors["encoder.0.embed.weight"].shape == (8, 12, 7)
  assert tensors["quantizer.quantizers.0.in_project.weight_v"].shape == (8, 12, 1)
  back = conv.amphion_to_params(tensors, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, back)
  again = conv.params_to_amphion(back, cfg)
  assert set(again) == set(tensors)
  for k in tensors:
    np.testing.assert_array_equal(again[k], tensors[k])


def test_file_round_trip_and_weight_norm_fold(parity_dir, tmp_path):
  path, _, _ = _fixture(parity_dir)
  cfg, params = conv.load_amphion(path)
  tensors, _ = common.load_safetensors(path)
  # Folding: w = g * v / ||v||, the norm over all dims but 0.
  v = tensors["quantizer.quantizers.0.in_project.weight_v"]
  g = tensors["quantizer.quantizers.0.in_project.weight_g"]
  w = g * v / np.linalg.norm(v.reshape(v.shape[0], -1), axis=1)[:, None, None]
  np.testing.assert_allclose(params["quantizer"]["layers_0"]["in_project"]["kernel"],
                             np.transpose(w, (2, 1, 0)), rtol=1e-6)
  out = str(tmp_path / "semantic.safetensors")
  conv.save_amphion(out, params, cfg)
  cfg2, params2 = conv.load_amphion(out)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  # The exported (v = w, g = ||w||) pair is the same weight as the original pair.
  exported, _ = common.load_safetensors(out)
  for key in tensors:
    if key.endswith("weight_v"):
      k = key[:-len("weight_v")]
      fold = lambda t: t[k + "weight_g"] * t[key] / np.linalg.norm(t[key].reshape(t[key].shape[0], -1), axis=1)[:, None, None]
      np.testing.assert_allclose(fold(exported), fold(tensors), rtol=1e-6, atol=1e-7)
    elif not key.endswith("weight_g"):
      np.testing.assert_array_equal(exported[key], tensors[key])


def test_wrong_file_is_refused_with_the_bad_keys(parity_dir):
  path, _, _ = _fixture(parity_dir)
  cfg, _ = conv.load_amphion(path)
  tensors, _ = common.load_safetensors(path)
  bad = dict(tensors)
  del bad["encoder.0.convnext.1.gamma"]
  bad["decoder.2.weight"] = np.zeros((3,), np.float32)
  bad["quantizer.quantizers.0.codebook.weight"] = np.zeros((255, 8), np.float32)
  with pytest.raises(common.ConversionError) as e:
    conv.amphion_to_params(bad, cfg, source="bad.safetensors")
  msg = str(e.value)
  assert "missing keys (1)" in msg and "encoder.0.convnext.1.gamma" in msg
  assert "unexpected keys (1)" in msg and "decoder.2.weight" in msg
  assert "mis-shaped keys (1)" in msg and "quantizer.quantizers.0.codebook.weight: file (255, 8), model (256, 8)" in msg
  # A config that does not match the file (3 layers) is refused too.
  with pytest.raises(common.ConversionError, match="encoder.0.convnext.2.gamma"):
    conv.amphion_to_params(tensors, dataclasses.replace(cfg, vocos_num_layers=3))
  # Another model's file.
  other = os.path.join(parity_dir, "acoustic_codec", "decoder.safetensors")
  with pytest.raises(common.ConversionError, match="not an Amphion semantic codec"):
    conv.load_amphion(other)
  with pytest.raises(common.ConversionError, match="missing keys"):
    conv.load_amphion(other, config=cfg)


def test_released_size():
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
      sc.abstract_params(sc.SemanticCodec(sc.SemanticCodecConfig()))))
  assert abs(n / 1e6 - 44.3) < 0.1, n
  shapes = conv.expected_shapes(sc.SemanticCodecConfig())
  assert shapes["encoder.0.embed.weight"] == (384, 1024, 7)
  assert shapes["encoder.0.convnext.11.pwconv1.weight"] == (2048, 384)
  assert shapes["quantizer.quantizers.0.out_project.weight_v"] == (1024, 8, 1)
  assert shapes["quantizer.quantizers.0.codebook.weight"] == (8192, 8)


@pytest.mark.slow
def test_training_lowers_the_loss_and_uses_many_codes():
  from metis_jax import config_base
  from metis_jax.training import codec_data, codec_state as cts, codec_step as codec_train_step
  from metis_jax.parallel import mesh as mesh_lib
  config = config_base.semantic_codec_config()
  config.model.update(dict(codebook_size=256, hidden_size=64, vocos_dim=32, vocos_intermediate_dim=64,
                           vocos_num_layers=2))
  config.features.source = "synthetic"
  t = config.train
  t.learning_rate, t.warmup_steps, t.restart_every, t.global_batch_size, t.crop_frames = 3e-3, 0, 15, 8, 50
  config.mesh.fsdp = 1
  setup = cts.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:1])
  state = cts.create_sharded_state(setup, mesh, 0)
  step = codec_train_step.jit_steps(setup, config, mesh, cts.state_shardings(setup, mesh))
  rng = np.random.default_rng(0)
  history = []
  for _ in range(60):
    feat = jnp.asarray(codec_data.synthetic_features(rng, 8, 50, 64, clusters=256))
    state, m = step(state, {"features": feat})
    history.append({k: float(v) for k, v in m.items()})
  first, last = np.mean([h["loss"] for h in history[:3]]), np.mean([h["loss"] for h in history[-3:]])
  assert last < 0.7 * first, (first, last)
  assert history[-1]["reconstruction"] < history[0]["reconstruction"]
  assert sum(h["restarted"] for h in history) > 0  # dead codes were re-drawn
  assert history[-1]["codes_used"] > 64, history[-1]  # of 256, in one batch of 400 frames
