"""w2v-BERT 2.0 conformer (`metis_jax.w2v_bert`), its converter and the SSL feature chain,
against Hugging Face `Wav2Vec2BertModel` with the same random weights."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.frontend import fbank, ssl_features
from metis_jax.parallel import sharding
from metis_jax.models import w2v_bert
from metis_jax.conversion import common
from metis_jax.conversion import w2v_bert as convert
from tests.conftest import REPO_ROOT, SPEECH, require_dir
from tests.test_fbank import load_16k

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL_HF = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)


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


def hf_model(seed: int = 0, computed_layers: int | None = None, **config):
  """Eager-attention HF model with `random_state_dict` weights (no torch init: built on meta).

  With `computed_layers`, only the first blocks are materialized (the later
  ones cannot influence `hidden_states[computed_layers]`).
  """
  hf_config = transformers.Wav2Vec2BertConfig(attn_implementation="eager", **config)
  with torch.device("meta"):
    model = transformers.Wav2Vec2BertModel(hf_config)
  if computed_layers is not None:
    model.encoder.layers = model.encoder.layers[:computed_layers]
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  weights = random_state_dict(shapes, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True, assign=True)
  return model.eval()


def state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hf_hidden(model, features, mask, layer):
  with torch.no_grad():
    out = model(torch.from_numpy(np.array(features, np.float32)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)), output_hidden_states=True)
  return out.hidden_states[layer].numpy()


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


@pytest.fixture(scope="module")
def small_hf():
  return hf_model(seed=1, **SMALL_HF)


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
  assert w2v_bert.W2VBertConfig.from_hf_config(transformers.Wav2Vec2BertConfig().to_dict()) == cfg
  with pytest.raises(ValueError, match="position_embeddings_type"):
    w2v_bert.W2VBertConfig.from_hf_config({"position_embeddings_type": "rotary"})
  with pytest.raises(ValueError, match="output_layer"):
    w2v_bert.W2VBertConfig(output_layer=25)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("scan", [True, False])
def test_small_matches_hf(small_hf, scan):
  """Padded batch of two lengths (90 frames: distances clip at both ends), every position."""
  sd = state_dict(small_hf)
  x, mask = padded_batch()
  cfg = w2v_bert.W2VBertConfig.small(scan_layers=scan)
  ours = apply_fn(cfg)(convert.hf_to_params(sd, cfg), x, mask)
  assert rel_err(ours, hf_hidden(small_hf, x, mask, 3)) < 1e-4
  if scan:
    # The N-th hidden state of a deeper file (block 3 present but not computed).
    cfg = w2v_bert.W2VBertConfig.small(output_layer=2)
    ours = apply_fn(cfg)(convert.hf_to_params(sd, cfg), x, mask)
    assert rel_err(ours, hf_hidden(small_hf, x, mask, 2)) < 1e-4
    # The padded sample equals itself alone (padding is masked everywhere).
    alone = apply_fn(cfg)(convert.hf_to_params(sd, cfg), x[1:, :57], None)
    assert rel_err(np.asarray(ours)[1, :57], alone[0]) < 1e-4


def test_small_mask_matters(small_hf):
  """The key-padding mask changes valid outputs (so the parity above tests it)."""
  cfg = w2v_bert.W2VBertConfig.small()
  params = convert.hf_to_params(state_dict(small_hf), cfg)
  x, mask = padded_batch()
  masked = np.asarray(apply_fn(cfg)(params, x, mask))
  unmasked = np.asarray(apply_fn(cfg)(params, x, np.ones_like(mask)))
  assert rel_err(masked[1, :57], unmasked[1, :57]) > 1e-2
  np.testing.assert_allclose(masked[0], unmasked[0], atol=1e-5)


def test_full_size_matches_hf_on_speech():
  """Released sizes (1024 wide, 24 blocks declared, 17 computed): the whole SSL chain.

  Two real clips of 0.8 s and 0.6 s (78 and 59 frames: the second has the
  half-padded token) through `SSLFeatureExtractor` (JAX fbank -> encoder ->
  stats) against Hugging Face's model on the same stacked features and its
  extractor's attention mask, normalized with the same statistics.
  """
  files = sorted(f for f in os.listdir(require_dir(SPEECH)) if f.startswith("libritts") and f.endswith(".wav"))
  waves = [load_16k(os.path.join(SPEECH, files[0]))[:12800], load_16k(os.path.join(SPEECH, files[1]))[:9700]]
  hf_in = transformers.SeamlessM4TFeatureExtractor()(waves, sampling_rate=16000, return_tensors="np", padding=True)
  hf_mask = hf_in["attention_mask"].astype(bool)
  assert hf_mask.sum(1).tolist() == [39, 29] and hf_mask.shape[1] == 39

  cfg = w2v_bert.W2VBertConfig()
  assert (cfg.num_layers, cfg.output_layer, cfg.hidden_size) == (24, 17, 1024)
  model = hf_model(seed=2, computed_layers=17)
  params = convert.hf_to_params(state_dict(model), cfg)
  rng = np.random.default_rng(0)
  mean, var = rng.standard_normal(1024).astype(np.float32), rng.uniform(0.2, 0.8, 1024).astype(np.float32)
  batch, lengths = fbank.pad_waveforms(waves)
  feats, feat_lengths = ssl_features.SSLFeatureExtractor(cfg, params, mean, var)(batch, lengths)
  np.testing.assert_array_equal(feat_lengths, [39, 30])

  fb = fbank.extract_jit(batch, lengths)
  np.testing.assert_array_equal(np.asarray(fb.mask), hf_mask)
  assert np.linalg.norm(np.asarray(fb.features) - hf_in["input_features"]) < 1e-4 * np.linalg.norm(
      hf_in["input_features"])
  ref = (hf_hidden(model, np.asarray(fb.features), hf_mask, 17) - mean) / np.sqrt(var)
  got = np.asarray(feats)
  valid = np.arange(39)[None, :] < np.asarray(feat_lengths)[:, None]
  assert rel_err(got, ref, valid) < 1e-4
  assert not got[~valid].any()


def test_ssl_features_small_chain(small_hf):
  """Real speech of two lengths, batched, against Hugging Face's extractor + model one clip at a time."""
  waves = [load_16k(os.path.join(require_dir(SPEECH), f))[:n]
           for f, n in (("metis_vc_source.wav", 20000), ("metis_vc_prompt.wav", 14250))]
  cfg = w2v_bert.W2VBertConfig.small()
  params = convert.hf_to_params(state_dict(small_hf), cfg)
  rng = np.random.default_rng(1)
  mean, var = rng.standard_normal(64).astype(np.float32), rng.uniform(0.2, 0.8, 64).astype(np.float32)
  extractor = ssl_features.SSLFeatureExtractor(cfg, params, mean, var)
  per_clip = extractor.from_list(waves, multiple=160)
  assert [f.shape for f in per_clip] == [(62, 64), (44, 64)]
  hf_extractor = transformers.SeamlessM4TFeatureExtractor()
  for wave, feats in zip(waves, per_clip):
    ref_in = hf_extractor(wave, sampling_rate=16000, return_tensors="np")
    ref = hf_hidden(small_hf, ref_in["input_features"], ref_in["attention_mask"].astype(bool), 3)[0]
    ref = (ref - mean) / np.sqrt(var)
    # Float32 vs float64 spectrum in the front-end (see test_fbank); the encoder itself is exact.
    assert np.linalg.norm(feats - ref) / np.linalg.norm(ref) < 1e-4


def test_sharded_apply_matches_unsharded(small_hf):
  """Logical axis names resolve under a (data, fsdp, tensor) mesh; init and apply work sharded."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  cfg = w2v_bert.W2VBertConfig.small()
  model = w2v_bert.W2VBert(cfg)
  x, mask = padded_batch(time=20, short=13)
  x = np.concatenate([x, x])
  mask = np.concatenate([mask, mask])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
  params = convert.hf_to_params(state_dict(small_hf), cfg)
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


def test_conversion_round_trip(small_hf, tmp_path):
  cfg = w2v_bert.W2VBertConfig.small()
  sd = state_dict(small_hf)
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
  unrolled_cfg = w2v_bert.W2VBertConfig.small(scan_layers=False)
  unrolled = convert.hf_to_params(sd, unrolled_cfg)
  assert "layers_2" in unrolled and "layers" not in unrolled
  jax.tree.map(np.testing.assert_array_equal, convert.params_to_hf(unrolled, unrolled_cfg), back)
  # Config inferred from shapes (heads are not in the shapes: given).
  inferred = convert.infer_config(sd, num_heads=4, output_layer=3)
  assert inferred == cfg
  # Our init and the converter agree on the tree structure and shapes.
  init = w2v_bert.abstract_params(cfg)
  assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(np.shape, params)


def test_wrong_files_are_refused(small_hf):
  cfg = w2v_bert.W2VBertConfig.small()
  sd = state_dict(small_hf)
  bad = dict(sd)
  del bad["encoder.layers.1.self_attn.linear_k.bias"]
  bad["encoder.layers.0.conv_module.depthwise_conv.weight"] = np.zeros((64, 1, 15), np.float32)
  bad["encoder.layers.0.self_attn.linear_pos.weight"] = np.zeros((64, 64), np.float32)
  bad["adapter.proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(common.ConversionError) as e:
    convert.hf_to_params(bad, cfg)
  msg = str(e.value)
  for key in ("encoder.layers.1.self_attn.linear_k.bias", "encoder.layers.0.conv_module.depthwise_conv.weight",
              "encoder.layers.0.self_attn.linear_pos.weight", "adapter.proj.weight"):
    assert key in msg
  assert "missing keys (1)" in msg and "unexpected keys (2)" in msg and "mis-shaped keys (1)" in msg
  # A wider model's file.
  with pytest.raises(common.ConversionError, match="mis-shaped"):
    convert.hf_to_params(sd, w2v_bert.W2VBertConfig.small(hidden_size=128))
  # Fewer blocks than computed.
  with pytest.raises(common.ConversionError, match="encoder.layers.2"):
    convert.hf_to_params({k: v for k, v in sd.items() if ".layers.2." not in k}, cfg)


def test_extra_blocks_are_ignored(small_hf):
  """A 6-block file (and masked_spec_embed) loads into a 3-block model; blocks >= 3 are not read."""
  cfg = w2v_bert.W2VBertConfig.small(num_layers=6)
  sd = state_dict(small_hf)
  extra = dict(sd)
  for k, v in sd.items():
    if k.startswith("encoder.layers.2."):
      extra[k.replace("layers.2.", "layers.4.")] = v
      extra[k.replace("layers.2.", "layers.5.")] = np.zeros((1,), np.float32)  # malformed, ignored
  assert "masked_spec_embed" in extra
  params = convert.hf_to_params(extra, cfg)
  jax.tree.map(np.testing.assert_array_equal, params, convert.hf_to_params(sd, cfg))


# --------------------------------------------------------------------------- statistics


def test_stats_conversion_and_loading(tmp_path):
  rng = np.random.default_rng(0)
  mean, var = rng.standard_normal(1024).astype(np.float32), rng.uniform(0.2, 0.8, 1024).astype(np.float32)
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


_UNPICKLED = []


def _record_unpickle():
  _UNPICKLED.append(True)
  return _Custom()


class _Custom:
  """Unpickling it calls `_record_unpickle` (stands for arbitrary code in a malicious file)."""

  def __reduce__(self):
    return (_record_unpickle, ())


def test_library_does_not_import_torch():
  code = ("import sys; import metis_jax.frontend.fbank, metis_jax.w2v_bert, metis_jax.ssl_features, "
          "metis_jax.conversion.w2v_bert; "
          "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env)
