"""w2v-BERT 2.0 conformer (`metis_jax.models.w2v_bert`), its converter and the SSL feature
chain, against Hugging Face `Wav2Vec2BertModel`.

The comparisons read the frozen fixture `../shared/data/parity/hf_w2v_bert` (transformers
4.41.2, random weights in Hugging Face's names, real speech; see its README). With torch and
transformers installed, optional live comparisons run as well (one at the released size).
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from metis_jax.frontend import fbank, ssl_features
from metis_jax.parallel import sharding
from metis_jax.models import w2v_bert
from metis_jax.conversion import common
from metis_jax.conversion import w2v_bert as convert
from tests import conftest
from tests.conftest import REPO_ROOT, SPEECH, require_dir
from tests.test_fbank import load_16k


@pytest.fixture(scope="module")
def hf_w2v():
  """(Hugging Face config dict, state dict, inputs, outputs) of the `hf_w2v_bert` fixture."""
  d = conftest.parity_fixture("hf_w2v_bert", "config.json", "weights.safetensors", "inputs.npz", "outputs.npz")
  with open(os.path.join(d, "config.json")) as f:
    config = json.load(f)
  return (config, load_file(os.path.join(d, "weights.safetensors")), dict(np.load(os.path.join(d, "inputs.npz"))),
          dict(np.load(os.path.join(d, "outputs.npz"))))


def fixture_config(hf_config, **overrides) -> w2v_bert.W2VBertConfig:
  """The fixture's encoder: width 128, 4 blocks (all computed), 4 heads, FFN 256."""
  return w2v_bert.W2VBertConfig.from_hf_config(hf_config, **{"output_layer": 4, **overrides})


def rel_err(ours, ref, where=None):
  ours, ref = np.asarray(ours), np.asarray(ref)
  if where is not None:
    ours, ref = ours[where], ref[where]
  return np.abs(ours - ref).max() / np.abs(ref).max()


def padded_batch(time=90, short=57, seed=0):
  x = np.random.default_rng(seed).standard_normal((2, time, 160)).astype(np.float32)
  mask = np.ones((2, time), bool)
  mask[1, short:] = False
  return x, mask


@functools.lru_cache(maxsize=None)
def apply_fn(config):
  """One jitted forward per config (shared across tests: fewer compilations)."""
  return jax.jit(lambda p, x, m: w2v_bert.W2VBert(config).apply({"params": p}, x, m))


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("length", [1, 5, 9, 10, 66, 100])
def test_relative_position_bias_matches_gather(length):
  left, right = 64, 8
  rel = np.random.default_rng(length).standard_normal((2, length, left + right + 1)).astype(np.float32)
  dist = np.clip(np.arange(length)[None, :] - np.arange(length)[:, None], -left, right) + left
  want = np.take_along_axis(rel, np.broadcast_to(dist, (2, length, length)), axis=-1)
  got = w2v_bert.relative_position_bias(jnp.asarray(rel), left, right)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_config_sizes():
  cfg = w2v_bert.W2VBertConfig()
  assert (cfg.hidden_size, cfg.num_layers, cfg.output_layer, cfg.num_heads, cfg.head_dim) == (1024, 24, 17, 16, 64)
  assert cfg.num_positions == 73 and cfg.intermediate_size == 4096 and cfg.conv_kernel_size == 31
  with pytest.raises(ValueError, match="position_embeddings_type"):
    w2v_bert.W2VBertConfig.from_hf_config({"position_embeddings_type": "rotary"})
  with pytest.raises(ValueError, match="output_layer"):
    w2v_bert.W2VBertConfig(output_layer=25)


@pytest.mark.parity
def test_config_from_the_fixture_hf_config(hf_w2v):
  """A Hugging Face config.json with the w2v-BERT 2.0 settings (only the sizes changed)."""
  hf_config = hf_w2v[0]
  got = w2v_bert.W2VBertConfig.from_hf_config(hf_config)
  assert got == w2v_bert.W2VBertConfig(hidden_size=128, num_layers=4, output_layer=4, num_heads=4,
                                        intermediate_size=256)
  released = dict(hf_config, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096)
  assert w2v_bert.W2VBertConfig.from_hf_config(released) == w2v_bert.W2VBertConfig()


# --------------------------------------------------------------------------- parity


@pytest.mark.parity
def test_feature_projection_matches_fixture(hf_w2v):
  """hidden_states[0]: LayerNorm over 160, Linear 160 -> 128, mask-0 tokens zeroed (numpy formula)."""
  _, sd, inputs, expected = hf_w2v
  x = inputs["input_features"].astype(np.float64)
  mask = inputs["attention_mask"].astype(bool)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-5) * sd["feature_projection.layer_norm.weight"] + sd["feature_projection.layer_norm.bias"]
  h = h @ sd["feature_projection.projection.weight"].T.astype(np.float64) + sd["feature_projection.projection.bias"]
  h = np.where(mask[..., None], h, 0.0)
  assert rel_err(h, expected["hidden_states"][0]) < 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_blocks_match_hf_fixture(hf_w2v, layer):
  """Padded batch of two real clips (90 tokens: distances clip at both ends; clip 0 ends with a
  half-padded token, clip 1 is padded from 70), hidden_states[layer] at every position."""
  hf_config, sd, inputs, expected = hf_w2v
  x, mask = inputs["input_features"], inputs["attention_mask"].astype(bool)
  np.testing.assert_array_equal(mask.sum(1), [89, 70])
  cfg = fixture_config(hf_config, output_layer=layer)
  ours = apply_fn(cfg)(convert.hf_to_params(sd, cfg), x, mask)
  assert rel_err(ours, expected["hidden_states"][layer]) < 1e-4


@pytest.mark.parity
def test_unrolled_blocks_and_unpadded_sample_match_hf_fixture(hf_w2v):
  hf_config, sd, inputs, expected = hf_w2v
  x, mask = inputs["input_features"], inputs["attention_mask"].astype(bool)
  cfg = fixture_config(hf_config, scan_layers=False)
  ours = apply_fn(cfg)(convert.hf_to_params(sd, cfg), x, mask)
  assert rel_err(ours, expected["hidden_states"][4]) < 1e-4
  # Clip 1 alone, without padding or mask, equals its padded batch row.
  scanned = fixture_config(hf_config)
  alone = apply_fn(scanned)(convert.hf_to_params(sd, scanned), x[1:, :70], None)
  assert rel_err(alone[0], expected["hidden_states"][4][1, :70]) < 1e-4


@pytest.mark.parity
def test_mask_matters(hf_w2v):
  """The key-padding mask changes valid outputs (so the parity above tests it)."""
  hf_config, sd, inputs, expected = hf_w2v
  cfg = fixture_config(hf_config)
  x, mask = inputs["input_features"], inputs["attention_mask"].astype(bool)
  unmasked = np.asarray(apply_fn(cfg)(convert.hf_to_params(sd, cfg), x, np.ones_like(mask)))
  assert rel_err(unmasked[1, :70], expected["hidden_states"][4][1, :70]) > 1e-2


@pytest.mark.parity
def test_ssl_features_chain_matches_hf_fixture(hf_w2v):
  """Waveforms -> JAX fbank -> encoder -> statistics against the fixture's extractor output and
  hidden states, normalized with the same statistics: one padded batch, and clip by clip."""
  hf_config, sd, inputs, expected = hf_w2v
  cfg = fixture_config(hf_config)
  params = convert.hf_to_params(sd, cfg)
  wav, num_samples = inputs["wav"], inputs["num_samples"]
  fb = fbank.extract_jit(wav, num_samples)
  np.testing.assert_array_equal(np.asarray(fb.mask), inputs["attention_mask"].astype(bool))
  assert np.linalg.norm(np.asarray(fb.features) - inputs["input_features"]) < 1e-4 * np.linalg.norm(
      inputs["input_features"])

  rng = np.random.default_rng(1)
  mean, var = rng.standard_normal(128).astype(np.float32), rng.uniform(0.2, 0.8, 128).astype(np.float32)
  ref = (expected["hidden_states"][4] - mean) / np.sqrt(var)
  extractor = ssl_features.SSLFeatureExtractor(cfg, params, mean, var)
  feats, lengths = extractor(wav, num_samples)
  np.testing.assert_array_equal(lengths, expected["token_lengths"])
  got = np.asarray(feats)
  valid = np.arange(90)[None, :] < expected["token_lengths"][:, None]
  # Float32 vs float64 spectrum in the front-end (see test_fbank); the encoder itself is exact.
  assert np.linalg.norm((got - ref)[valid]) / np.linalg.norm(ref[valid]) < 1e-4
  assert not got[~valid].any()
  per_clip = extractor.from_list([wav[0, :num_samples[0]], wav[1, :num_samples[1]]], multiple=160)
  assert [f.shape for f in per_clip] == [(90, 128), (70, 128)]
  for i, f in enumerate(per_clip):
    assert np.linalg.norm(f - ref[i, :len(f)]) / np.linalg.norm(ref[i, :len(f)]) < 1e-4


def test_sharded_apply_matches_unsharded(hf_w2v):
  """Logical axis names resolve under a (data, fsdp, tensor) mesh; init and apply work sharded."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  hf_config, sd, _, _ = hf_w2v
  cfg = fixture_config(hf_config)
  model = w2v_bert.W2VBert(cfg)
  x, mask = padded_batch(time=20, short=13)
  x = np.concatenate([x, x])
  mask = np.concatenate([mask, mask])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
  params = convert.hf_to_params(sd, cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, mask))["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    kernel = sharded["layers"]["ffn1"]["intermediate_dense"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    out = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))(sharded, x, mask)
  ref = apply_fn(cfg)(params, x, mask)
  assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- conversion


def test_conversion_round_trip(hf_w2v, tmp_path):
  hf_config, sd, _, _ = hf_w2v
  cfg = fixture_config(hf_config)
  params = convert.hf_to_params(sd, cfg)
  back = convert.params_to_hf(params, cfg)
  assert set(back) == set(sd) - {"masked_spec_embed"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # ours -> file -> ours, scanned and unrolled layouts.
  path = str(tmp_path / "model.safetensors")
  convert.save_hf(path, params, cfg)
  loaded_cfg, loaded = convert.load_hf(path, cfg)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  unrolled_cfg = fixture_config(hf_config, scan_layers=False)
  unrolled = convert.hf_to_params(sd, unrolled_cfg)
  assert "layers_3" in unrolled and "layers" not in unrolled
  jax.tree.map(np.testing.assert_array_equal, convert.params_to_hf(unrolled, unrolled_cfg), back)
  # Config inferred from shapes (heads are not in the shapes: given).
  inferred = convert.infer_config(sd, num_heads=4, output_layer=4)
  assert inferred == cfg
  # Our init and the converter agree on the tree structure and shapes.
  init = w2v_bert.abstract_params(cfg)
  assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(np.shape, params)


def test_wrong_files_are_refused(hf_w2v):
  hf_config, sd, _, _ = hf_w2v
  cfg = fixture_config(hf_config)
  bad = dict(sd)
  del bad["encoder.layers.1.self_attn.linear_k.bias"]
  bad["encoder.layers.0.conv_module.depthwise_conv.weight"] = np.zeros((128, 1, 15), np.float32)
  bad["encoder.layers.0.self_attn.linear_pos.weight"] = np.zeros((128, 128), np.float32)
  bad["adapter.proj.weight"] = np.zeros((128, 128), np.float32)
  with pytest.raises(common.ConversionError) as e:
    convert.hf_to_params(bad, cfg)
  msg = str(e.value)
  for key in ("encoder.layers.1.self_attn.linear_k.bias", "encoder.layers.0.conv_module.depthwise_conv.weight",
              "encoder.layers.0.self_attn.linear_pos.weight", "adapter.proj.weight"):
    assert key in msg
  assert "missing keys (1)" in msg and "unexpected keys (2)" in msg and "mis-shaped keys (1)" in msg
  # A wider model's file.
  with pytest.raises(common.ConversionError, match="mis-shaped"):
    convert.hf_to_params(sd, fixture_config(hf_config, hidden_size=256))
  # Fewer blocks than computed.
  with pytest.raises(common.ConversionError, match="encoder.layers.3"):
    convert.hf_to_params({k: v for k, v in sd.items() if ".layers.3." not in k}, cfg)


def test_extra_blocks_are_ignored(hf_w2v):
  """An 8-block file (and masked_spec_embed) loads into a 4-block model; blocks >= 4 are not read."""
  hf_config, sd, _, _ = hf_w2v
  cfg = fixture_config(hf_config, num_layers=8)
  extra = dict(sd)
  for k, v in sd.items():
    if k.startswith("encoder.layers.3."):
      extra[k.replace("layers.3.", "layers.4.")] = v
      extra[k.replace("layers.3.", "layers.7.")] = np.zeros((1,), np.float32)  # malformed, ignored
  assert "masked_spec_embed" in extra
  params = convert.hf_to_params(extra, cfg)
  jax.tree.map(np.testing.assert_array_equal, params, convert.hf_to_params(sd, fixture_config(hf_config)))


# --------------------------------------------------------------------------- statistics


def _stats(hidden=1024, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(hidden).astype(np.float32), rng.uniform(0.2, 0.8, hidden).astype(np.float32)


def test_stats_loading_and_refusals(tmp_path):
  mean, var = _stats()
  good = str(tmp_path / "stats.npz")
  np.savez(good, mean=mean, var=var)
  got_mean, got_var = convert.load_stats(good)
  np.testing.assert_array_equal(got_mean, mean)
  np.testing.assert_array_equal(got_var, var)
  cases = {"no_var": dict(mean=mean), "short": dict(mean=mean, var=var[:512]),
           "2d": dict(mean=mean[None], var=var), "nonpositive": dict(mean=mean, var=var - 1.0)}
  for name, arrays in cases.items():
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **arrays)
    with pytest.raises(common.ConversionError):
      convert.load_stats(path)
  obj = str(tmp_path / "object.npz")
  np.savez(obj, mean=np.array([{"a": 1}], dtype=object), var=var)
  with pytest.raises(common.ConversionError):
    convert.load_stats(obj)
  with pytest.raises(common.ConversionError):
    convert.load_stats(str(tmp_path / "absent.npz"))


def test_stats_conversion_without_torch_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  pt = str(tmp_path / "wav2vec2bert_stats.pt")
  with pytest.raises(ImportError) as e:
    convert.convert_stats(pt, str(tmp_path / "stats.npz"))
  msg = str(e.value)
  assert pt in msg and "needs torch" in msg and "pip install torch" in msg and "\n" not in msg
  assert not os.path.exists(str(tmp_path / "stats.npz"))


def test_stats_conversion_from_pt(tmp_path):
  """Optional (the `stats` extra): Amphion's .pt -> .npz, and unsafe or wrong .pt files refused."""
  torch = pytest.importorskip("torch", reason="convert_stats needs torch, installed by hand")
  mean, var = _stats()
  pt, npz = str(tmp_path / "wav2vec2bert_stats.pt"), str(tmp_path / "stats.npz")
  torch.save({"mean": torch.from_numpy(mean), "var": torch.from_numpy(var)}, pt)
  convert.convert_stats(pt, npz)
  got_mean, got_var = convert.load_stats(npz)
  np.testing.assert_array_equal(got_mean, mean)
  np.testing.assert_array_equal(got_var, var)

  # A checkpoint that needs arbitrary unpickling is refused (weights_only).
  evil = str(tmp_path / "evil.pt")
  torch.save({"mean": torch.from_numpy(mean), "var": torch.from_numpy(var), "obj": _Custom()}, evil)
  _UNPICKLED.clear()
  with pytest.raises(common.ConversionError, match="not a plain tensor checkpoint"):
    convert.convert_stats(evil, str(tmp_path / "evil.npz"))
  assert not _UNPICKLED, "the .pt file ran code while loading"
  wrong = str(tmp_path / "wrong.pt")
  torch.save({"mean": torch.from_numpy(mean)}, wrong)
  with pytest.raises(common.ConversionError, match="'mean' and 'var'"):
    convert.convert_stats(wrong, str(tmp_path / "wrong.npz"))


_UNPICKLED = []


def _record_unpickle():
  _UNPICKLED.append(True)
  return _Custom()


class _Custom:
  """Unpickling it calls `_record_unpickle` (stands for arbitrary code in a malicious file)."""

  def __reduce__(self):
    return (_record_unpickle, ())


def test_library_does_not_import_torch():
  code = ("import sys; import metis_jax.frontend.fbank, metis_jax.models.w2v_bert, "
          "metis_jax.frontend.ssl_features, metis_jax.conversion.w2v_bert; "
          "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env)


# --------------------------------------------------------------------------- optional: live Hugging Face


def live_modules():
  """(torch, transformers), or a skip: the live comparisons are optional (neither is in the test extra)."""
  torch = pytest.importorskip("torch", reason="optional live comparison: torch is not installed")
  transformers = pytest.importorskip("transformers", reason="optional live comparison: transformers is not installed")
  return torch, transformers


def random_state_dict(shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
  """Informative random weights, fast even at full size (views into a few random pools).

  Matrices ~ N(0, 1/fan_in), LayerNorm gains 1 + N(0, 0.1) and biases
  N(0, 0.1), distance tables N(0, 1) (so the position bias matters). Each
  tensor is a window at its own offset of a shared pool, so no two are equal.
  """
  rng = np.random.default_rng(seed)
  pool = rng.standard_normal(1 << 23, dtype=np.float32)
  scaled = {}
  out = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    n = int(np.prod(shape))
    if "norm" in name and name.endswith("weight"):
      out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
      continue
    if "distance_embedding" in name:
      scale = 1.0
    elif len(shape) >= 2:
      scale = 1.0 / np.sqrt(np.prod(shape[1:]))
    else:
      scale = 0.1
    if scale not in scaled:
      scaled[scale] = pool * np.float32(scale)
    start = (i * 104729) % (pool.size - n)
    out[name] = scaled[scale][start:start + n].reshape(shape)
  return out


def hf_model(weights=None, seed: int = 0, computed_layers: int | None = None, **config):
  """Eager-attention HF model (built on meta, no torch init) with `weights`, else `random_state_dict` ones.

  With `computed_layers`, only the first blocks are materialized (the later
  ones cannot influence `hidden_states[computed_layers]`).
  """
  torch, transformers = live_modules()
  hf_config = transformers.Wav2Vec2BertConfig(attn_implementation="eager", **config)
  with torch.device("meta"):
    model = transformers.Wav2Vec2BertModel(hf_config)
  if computed_layers is not None:
    model.encoder.layers = model.encoder.layers[:computed_layers]
  if weights is None:
    weights = random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True, assign=True)
  return model.eval()


def hf_hidden(model, features, mask, layer):
  torch, _ = live_modules()
  with torch.no_grad():
    out = model(torch.from_numpy(np.array(features, np.float32)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
  return out.hidden_states[layer].numpy()


@pytest.mark.parity
def test_fixture_matches_live_hf(hf_w2v):
  """Optional: the installed transformers reproduces the fixture, and so do we against it."""
  _, transformers = live_modules()
  hf_config, sd, inputs, expected = hf_w2v
  assert w2v_bert.W2VBertConfig.from_hf_config(transformers.Wav2Vec2BertConfig().to_dict()) == w2v_bert.W2VBertConfig()
  config = {k: v for k, v in hf_config.items() if k not in ("transformers_version", "model_type")}
  model = hf_model(sd, **config)
  mask = inputs["attention_mask"].astype(bool)
  for layer in range(5):
    live = hf_hidden(model, inputs["input_features"], mask, layer)
    assert rel_err(live, expected["hidden_states"][layer]) < 1e-4, layer
  cfg = fixture_config(hf_config)
  ours = apply_fn(cfg)(convert.hf_to_params(sd, cfg), inputs["input_features"], mask)
  assert rel_err(ours, live) < 1e-4


@pytest.mark.slow
@pytest.mark.parity
def test_full_size_matches_live_hf_on_speech():
  """Optional: released sizes (1024 wide, 24 blocks declared, 17 computed), the whole SSL chain.

  Two real clips of 0.8 s and 0.6 s (78 and 59 frames: the second has the
  half-padded token) through `SSLFeatureExtractor` (JAX fbank -> encoder ->
  stats) against Hugging Face's model on the same stacked features and its
  extractor's attention mask, normalized with the same statistics.
  """
  _, transformers = live_modules()
  files = sorted(f for f in os.listdir(require_dir(SPEECH)) if f.startswith("libritts") and f.endswith(".wav"))
  waves = [load_16k(os.path.join(SPEECH, files[0]))[:12800], load_16k(os.path.join(SPEECH, files[1]))[:9700]]
  hf_in = transformers.SeamlessM4TFeatureExtractor()(waves, sampling_rate=16000, return_tensors="np", padding=True)
  hf_mask = hf_in["attention_mask"].astype(bool)
  assert hf_mask.sum(1).tolist() == [39, 29] and hf_mask.shape[1] == 39

  cfg = w2v_bert.W2VBertConfig()
  model = hf_model(seed=2, computed_layers=17)
  params = convert.hf_to_params({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg)
  mean, var = _stats()
  batch, lengths = fbank.pad_waveforms(waves)
  feats, feat_lengths = ssl_features.SSLFeatureExtractor(cfg, params, mean, var)(batch, lengths)
  np.testing.assert_array_equal(feat_lengths, [39, 30])

  fb = fbank.extract_jit(batch, lengths)
  np.testing.assert_array_equal(np.asarray(fb.mask), hf_mask)
  ref = (hf_hidden(model, np.asarray(fb.features), hf_mask, 17) - mean) / np.sqrt(var)
  got = np.asarray(feats)
  valid = np.arange(39)[None, :] < np.asarray(feat_lengths)[:, None]
  assert rel_err(got, ref, valid) < 1e-4
  assert not got[~valid].any()
