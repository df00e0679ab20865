"""S2A: parity with the original, conversion, layer-wise decoding invariants, objective."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from metis_jax import config_lib
from metis_jax.models import s2a
from metis_jax.inference import s2a_decoding
from metis_jax.conversion import common
from metis_jax.conversion import s2a as convert_s2a


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _load(parity_dir, name):
  cfg, params = convert_s2a.load_amphion(os.path.join(parity_dir, name, "weights.safetensors"))
  return cfg, s2a.S2AModel(s2a.S2AConfig.from_config(cfg)), params


@pytest.mark.parity
@pytest.mark.parametrize("name,first", [("s2a_1layer", True), ("s2a_full", False)])
def test_forward_reproduces_original(parity_dir, name, first):
  cfg, model, params = _load(parity_dir, name)
  assert cfg.predicts_first_layer == first
  inputs = dict(np.load(os.path.join(parity_dir, name, "inputs.npz")))
  expected = dict(np.load(os.path.join(parity_dir, name, "outputs.npz")))
  batch, length, _ = inputs["x0"].shape
  is_prompt = np.arange(length)[None] < inputs["prompt_len"][:, None]
  hidden, logits = model.apply(
      {"params": params}, jnp.asarray(inputs["x0"]), jnp.asarray(inputs["cond_code"]),
      jnp.int32(inputs["mask_layer"]), jnp.asarray(inputs["mask"].astype(bool)),
      jnp.asarray(is_prompt), jnp.asarray(inputs["x_mask"].astype(bool)), jnp.asarray(inputs["t"]),
      positions=jnp.broadcast_to(jnp.arange(length), (batch, length)))
  assert _rel(hidden, expected["hidden"]) < 1e-4
  assert _rel(logits, expected["logits"]) < 1e-4
  layer = int(inputs["mask_layer"])
  weights = inputs["mask"] * inputs["x_mask"]
  logp = jax.nn.log_softmax(logits)
  ce = -np.take_along_axis(np.asarray(logp), inputs["x0"][..., layer][..., None], -1)[..., 0]
  loss = (ce * weights).sum() / weights.sum()
  assert abs(loss - float(expected["loss"])) / float(expected["loss"]) < 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("name", ["s2a_1layer", "s2a_full"])
@pytest.mark.parametrize("cfg_scale", [0.0, 2.5])
def test_layerwise_decoder_reproduces_original(parity_dir, name, cfg_scale):
  _, model, params = _load(parity_dir, name)
  inputs = dict(np.load(os.path.join(parity_dir, f"{name}_decode", "inputs.npz")))
  expected = np.load(os.path.join(parity_dir, f"{name}_decode", "outputs.npz"))[f"tokens_cfg{cfg_scale}"]
  prompt_len = inputs["prompt"].shape[1]
  cond = inputs["cond_code"]
  options = s2a_decoding.S2ADecodeOptions(
      steps=tuple(int(s) for s in inputs["n_timesteps"]), cfg=cfg_scale,
      rescale_cfg=float(inputs["rescale_cfg"]), temperature=0.0, confidence_noise=0.0,
      top_k_ratio=1.0 - float(inputs["filter_thres"]))
  given = jnp.asarray(inputs["gt_code"]) if "gt_code" in inputs else None
  codes = s2a_decoding.S2ADecoder(model, options)(
      params, jax.random.key(0), jnp.asarray(cond[:, :prompt_len]), jnp.asarray(inputs["prompt"]),
      jnp.array([prompt_len]), jnp.asarray(cond[:, prompt_len:]),
      jnp.array([cond.shape[1] - prompt_len]), given=given)
  np.testing.assert_array_equal(np.asarray(codes), expected)


def _tiny_s2a(num_quantizers=4, predicts_first_layer=False, seed=0):
  cfg = config_lib.load_config("tiny").model
  cfg.kind, cfg.vocab_size, cfg.cond_vocab_size = "s2a", 32, 64
  cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.dtype = 32, 2, 2, "float32"
  cfg.num_quantizers, cfg.predicts_first_layer = num_quantizers, predicts_first_layer
  model = s2a.S2AModel(s2a.S2AConfig.from_config(cfg))
  params = s2a.init_params(model, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.3, params)
  return cfg, model, params


@pytest.mark.slow
def test_converter_round_trip_and_strict_refusal(tmp_path):
  cfg, _, params = _tiny_s2a()
  path = str(tmp_path / "s2a.safetensors")
  convert_s2a.save_amphion(path, params, cfg)
  loaded_cfg, loaded = convert_s2a.load_amphion(path, num_heads=2)
  for key in ("hidden_size", "num_layers", "num_quantizers", "vocab_size", "cond_vocab_size",
              "predicts_first_layer"):
    assert loaded_cfg[key] == cfg[key], key
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
  tensors, _ = common.load_safetensors(path)
  tensors["diff_estimator.embed_tokens.weight"] = np.zeros((0, 256), np.float32)  # ignored
  convert_s2a.amphion_to_params(tensors, cfg)
  del tensors["token_emb.3.weight"]
  tensors["to_logits.0.bias"] = np.zeros((7,), np.float32)
  with pytest.raises(common.ConversionError) as err:
    convert_s2a.amphion_to_params(tensors, cfg, source="x.safetensors")
  assert "token_emb.3.weight" in str(err.value) and "to_logits.0.bias: file (7,)" in str(err.value)


def _decode(model, params, options, prompts, targets, keys, given=None, num_q=4):
  rng = np.random.default_rng(1)
  batch = len(targets)
  p_len, t_len = max(max(prompts), 1), max(targets)
  prompt_sem = rng.integers(0, 64, (batch, p_len))
  prompt_ac = rng.integers(0, 32, (batch, p_len, num_q))
  target_sem = rng.integers(0, 64, (batch, t_len))
  return np.asarray(s2a_decoding.S2ADecoder(model, options)(
      params, keys, jnp.asarray(prompt_sem), jnp.asarray(prompt_ac), jnp.array(prompts),
      jnp.asarray(target_sem), jnp.array(targets), given=given)), (prompt_sem, prompt_ac, target_sem)


@pytest.mark.slow
def test_layer_zero_from_the_one_layer_model_is_kept_and_padding_is_zero():
  _, model, params = _tiny_s2a()
  options = s2a_decoding.S2ADecodeOptions(steps=(3, 2, 1, 1), cfg=2.5)
  given = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 9, 1)))
  codes, _ = _decode(model, params, options, [4, 2], [9, 6], jax.random.key(0), given=given)
  np.testing.assert_array_equal(codes[0, :, 0], np.asarray(given)[0, :, 0])
  np.testing.assert_array_equal(codes[1, :6, 0], np.asarray(given)[1, :6, 0])
  assert (codes[1, 6:] == 0).all()
  assert ((codes >= 0) & (codes < 32)).all()


@pytest.mark.slow
def test_sample_does_not_depend_on_batch_mates():
  _, model, params = _tiny_s2a(predicts_first_layer=True)
  options = s2a_decoding.S2ADecodeOptions(steps=(4, 2, 1, 1), cfg=2.5, temperature=1.5)
  rng = np.random.default_rng(3)
  prompts, targets = [5, 2, 0], [7, 11, 4]
  sems = [rng.integers(0, 64, 16) for _ in range(3)]
  acs = [rng.integers(0, 32, (16, 4)) for _ in range(3)]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(9), i))(jnp.arange(3))

  def run(idx):
    p_len, t_len = max(max(prompts[i] for i in idx), 1), max(targets[i] for i in idx)
    ps = np.stack([sems[i][:p_len] for i in idx])
    pa = np.stack([acs[i][:p_len] for i in idx])
    ts = np.stack([sems[i][8:8 + t_len] for i in idx])
    return np.asarray(s2a_decoding.S2ADecoder(model, options)(
        params, keys[np.array(idx)], jnp.asarray(ps), jnp.asarray(pa),
        jnp.array([prompts[i] for i in idx]), jnp.asarray(ts), jnp.array([targets[i] for i in idx])))

  together = run([0, 1, 2])
  for i in range(3):
    alone = run([i])
    np.testing.assert_array_equal(alone[0, :targets[i]], together[i, :targets[i]], err_msg=f"sample {i}")


def test_layer_schedule_weights_follow_the_reference():
  cfg = config_lib.load_config("tiny").model
  cfg.kind, cfg.vocab_size, cfg.cond_vocab_size, cfg.num_quantizers = "s2a", 32, 64, 12
  model = s2a.S2AModel(s2a.S2AConfig.from_config(cfg))  # the config only: no parameters
  # Spec section 7, "linear": with predict_layer_1 false (12 quantizers), layer 0 gets 0 and
  # layers 1..11 get 12, 11, ..., 2 (sum 77); the 1-layer model always uses layer 0.
  expected = np.array([0, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2], np.float64) / 77
  np.testing.assert_allclose(s2a.layer_weights(model.config), expected, rtol=1e-6)
  one = s2a.S2AConfig(backbone=model.config.backbone, num_quantizers=1, predicts_first_layer=True)
  np.testing.assert_allclose(s2a.layer_weights(one), [1.0])
  # The sampler draws by those weights: a chi-square test of 5000 draws (fixed seed), which a
  # uniform choice over layers 1..11 fails by far.
  n = 5000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(jax.vmap(lambda k: s2a.sample_target_layer(k, model.config))(keys))
  counts = np.bincount(draws, minlength=12)
  assert counts[0] == 0 and counts.sum() == n
  critical = scipy.stats.chi2.ppf(0.999, df=10)
  chi2 = lambda p: float(np.sum((counts[1:] - n * p[1:]) ** 2 / (n * p[1:])))
  assert chi2(expected) < critical, (counts, n * expected)
  assert chi2(np.array([0] + [1 / 11] * 11)) > 10 * critical


@pytest.mark.slow
def test_tiny_s2a_objective_learns_a_fixed_batch():
  import optax
  from metis_jax.models import masking
  cfg, model, _ = _tiny_s2a()
  params = s2a.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 32, (4, 16, 4)))
  cond = jnp.asarray(rng.integers(0, 64, (4, 16)))
  valid = jnp.asarray(np.arange(16)[None] < np.array([16, 14, 12, 9])[:, None])
  masking_cfg = masking.MaskingConfig(min_mask_ratio=0.0, prompt_max_fraction=0.5)
  layer, corruption = s2a.sample_training_corruption(jax.random.key(1), valid, model.config, masking_cfg)
  assert 1 <= int(layer) < 4
  assert not (corruption.is_masked & ~valid).any()
  optimizer = optax.adam(1e-2)
  state = optimizer.init(params)

  @jax.jit
  def step(p, s):
    (loss, _), g = jax.value_and_grad(
        lambda p: s2a.training_loss(p, model, tokens, cond, valid, layer, corruption)[:2],
        has_aux=True)(p)
    u, s = optimizer.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(100):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[0] > 2.5 and losses[-1] < 0.1, (losses[0], losses[-1])
