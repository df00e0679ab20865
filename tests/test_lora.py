"""LoRA on the backbone: a new one is a no-op, merged equals unmerged, factors shard like W."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.models import metis
from metis_jax.nn import lora as lora_lib
from metis_jax.parallel import sharding
from tests import helpers

RANK, ALPHA = 4, 8.0


def _lora_model(scan=True, targets=lora_lib.TARGETS, dropout=0.0):
  cfg = helpers.tiny_model_config(scan_layers=scan, lora_rank=RANK, lora_alpha=ALPHA,
                                  lora_dropout=dropout, lora_targets=tuple(targets))
  return metis.MetisModel(metis.MetisConfig.from_config(cfg))


def _with_fresh_lora(base_params, model, seed=0):
  """The base params plus the LoRA leaves of a new LoRA (B = 0)."""
  fresh = metis.init_params(model, jax.random.key(seed))

  def add(base, new):
    if not isinstance(new, dict):
      return base
    return {k: (add(base[k], v) if k in base else v) for k, v in new.items()}

  return add(base_params, fresh)


def _randomize_b(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
      if str(path[-1].key) == "lora_b" else x, params)


def _paths(tree):
  return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_new_lora_is_an_exact_no_op(scan):
  _, base_model, base_params = helpers.tiny_model(seed=2, scan_layers=scan)
  model = _lora_model(scan)
  params = _with_fresh_lora(base_params, model)
  assert lora_lib.has_lora(params) and not lora_lib.has_lora(base_params)
  args = base_model.init_inputs(2, 8)
  args["tokens"] = jax.random.randint(jax.random.key(3), (2, 8), 0, 128)
  _, base = base_model.apply({"params": base_params}, **args)
  _, with_lora = model.apply({"params": params}, **args)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))
  _, moved = model.apply({"params": _randomize_b(params)}, **args)
  assert np.abs(np.asarray(moved) - np.asarray(base)).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_merged_equals_unmerged_and_has_the_base_layout(scan):
  _, base_model, base_params = helpers.tiny_model(seed=4, scan_layers=scan)
  model = _lora_model(scan)
  params = _randomize_b(_with_fresh_lora(base_params, model))
  merged = metis.merge_lora(params, model.config)
  assert _paths(merged) == _paths(base_params)
  args = base_model.init_inputs(2, 8)
  args["tokens"] = jax.random.randint(jax.random.key(5), (2, 8), 0, 128)
  _, unmerged_logits = model.apply({"params": params}, **args)
  _, merged_logits = base_model.apply({"params": merged}, **args)
  np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(unmerged_logits),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_merge_is_w_plus_scaled_a_b():
  """Checked per kernel against the released layout: W[out,in] + (alpha/r) B[out,r] A[r,in]."""
  _, _, base_params = helpers.tiny_model(seed=6, scan_layers=False)
  model = _lora_model(scan=False)
  params = _randomize_b(_with_fresh_lora(base_params, model))
  merged = lora_lib.merge_lora(params, model.config.lora)
  node = params["backbone"]["layers_1"]["attention"]["out"]  # kernel [heads, head_dim, embed]
  heads, head_dim, embed = node["kernel"].shape
  w = np.asarray(node["kernel"]).reshape(heads * head_dim, embed).T  # [out, in]
  a = np.asarray(node["lora_a"]).reshape(heads * head_dim, RANK).T  # [r, in]
  b = np.asarray(node["lora_b"]).T  # [out, r]
  expected = (w + ALPHA / RANK * b @ a).T.reshape(heads, head_dim, embed)
  got = np.asarray(merged["backbone"]["layers_1"]["attention"]["out"]["kernel"])
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_targets_select_the_adapted_maps_and_b_starts_at_zero():
  model = _lora_model(targets=("q_proj", "v_proj", "down_proj"))
  params = metis.init_params(model, jax.random.key(0))
  with_lora = [p for p in _paths(params) if "lora" in p]
  assert with_lora == sorted(f"['backbone']['layers']['{m}']['{n}']['{f}']" for m, n in
                             (("attention", "query"), ("attention", "value"), ("mlp", "down"))
                             for f in ("lora_a", "lora_b"))
  layers = params["backbone"]["layers"]
  assert layers["attention"]["query"]["lora_a"].shape == (2, 64, RANK)
  assert layers["attention"]["query"]["lora_b"].shape == (2, RANK, 4, 16)
  assert layers["mlp"]["down"]["lora_a"].shape == (2, 256, RANK)
  assert layers["mlp"]["down"]["lora_b"].shape == (2, RANK, 64)
  assert not np.any(np.asarray(layers["mlp"]["down"]["lora_b"]))
  assert np.asarray(layers["mlp"]["down"]["lora_a"]).std() > 0


def test_unknown_target_is_refused():
  with pytest.raises(ValueError, match="unknown LoRA targets"):
    _lora_model(targets=("q_proj", "qkv"))


def test_factors_carry_the_logical_axes_of_their_kernel():
  model = _lora_model(targets=("q_proj", "o_proj", "gate_proj"))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.init_inputs()))["params"]
  specs = nn.get_partition_spec(boxed)["backbone"]["layers"]
  names = lambda node: tuple(node)
  assert names(specs["attention"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert names(specs["attention"]["query"]["lora_a"]) == ("layers", "embed", "lora_rank")
  assert names(specs["attention"]["query"]["lora_b"]) == ("layers", "lora_rank", "heads", "kv")
  assert names(specs["attention"]["out"]["lora_a"]) == ("layers", "heads", "kv", "lora_rank")
  assert names(specs["attention"]["out"]["lora_b"]) == ("layers", "lora_rank", "embed")
  assert names(specs["mlp"]["gate"]["lora_a"]) == ("layers", "embed", "lora_rank")
  assert names(specs["mlp"]["gate"]["lora_b"]) == ("layers", "lora_rank", "mlp")
  mesh_axes = nn.logical_to_mesh_axes(("layers", "embed", "lora_rank"), sharding.DEFAULT_RULES)
  assert tuple(mesh_axes) == (None, "fsdp", None)
  assert ("lora_rank", None) in sharding.rules_from_config([["embed", "fsdp"]])


@pytest.mark.slow
def test_dropout_acts_only_with_a_dropout_rng():
  _, base_model, base_params = helpers.tiny_model(seed=7)
  model = _lora_model(dropout=0.5)
  params = _randomize_b(_with_fresh_lora(base_params, model))
  args = base_model.init_inputs(2, 8)
  _, eval_a = model.apply({"params": params}, **args)
  _, eval_b = model.apply({"params": params}, **args)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  _, no_dropout = _lora_model(dropout=0.0).apply({"params": params}, **args)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(no_dropout))
  _, train = model.apply({"params": params}, **args, rngs={"dropout": jax.random.key(0)})
  assert np.abs(np.asarray(train) - np.asarray(eval_a)).max() > 1e-3


@pytest.mark.slow
def test_lora_b_gets_a_gradient_from_a_new_lora():
  _, base_model, base_params = helpers.tiny_model(seed=8)
  model = _lora_model()
  params = _with_fresh_lora(base_params, model)
  args = base_model.init_inputs(2, 8)

  def loss(p):
    return jnp.sum(model.apply({"params": p}, **args)[1] ** 2)

  grads = jax.grad(loss)(params)["backbone"]["layers"]
  assert np.abs(np.asarray(grads["mlp"]["up"]["lora_b"])).max() > 0
  # B = 0, so A's gradient is exactly zero at the start (as in peft).
  assert not np.any(np.asarray(grads["mlp"]["up"]["lora_a"]))
