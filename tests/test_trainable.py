"""Trainable subsets: masks by group or regex, the (trainable, frozen) split, size report."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metis_jax import config_lib
from metis_jax.models import metis
from metis_jax.training import trainable
from tests import helpers


def _tiny_shapes():
  cfg = helpers.tiny_model_config(lora_rank=2, lora_alpha=4.0, cond_feature_dim=8,
                                  use_phone_cond=True)
  model = metis.MetisModel(metis.MetisConfig.from_config(cfg))
  return jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0)))


def _selected(params, spec):
  mask = trainable.trainable_mask(params, spec)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {trainable.path_name(p) for p, m in flat if m}


def test_named_sets_select_their_groups():
  params = _tiny_shapes()
  everything = {trainable.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  lora = {n for n in everything if n.endswith(("/lora_a", "/lora_b"))}
  adapter = {n for n in everything if n.startswith("adapter/")}
  phones = {n for n in everything if n.startswith(("phone_embed/", "phone_mlp/"))}
  assert len(lora) == 14 and len(adapter) == 5 and len(phones) == 5
  assert _selected(params, "full") == everything
  assert _selected(params, "adapter") == adapter
  assert _selected(params, "lora+adapter") == lora | adapter
  assert _selected(params, "lora+phones") == lora | phones
  assert "token_embed/embedding" in everything - _selected(params, "lora+adapter+phones")
  assert _selected(params, "re:^to_logits/") == {"to_logits/kernel", "to_logits/bias"}
  assert _selected(params, [r"query/lora_b$", r"^mask_embedding$"]) == {
      "backbone/layers/attention/query/lora_b", "mask_embedding"}


@pytest.mark.slow
def test_bad_specs_are_refused():
  params = _tiny_shapes()
  with pytest.raises(ValueError, match="unknown trainable group"):
    trainable.trainable_mask(params, "lora+adaptor")
  base_only = helpers.tiny_model()[2]
  with pytest.raises(ValueError, match="selects no parameter"):
    trainable.trainable_mask(base_only, "lora")


@pytest.mark.slow
def test_split_join_and_a_step_that_trains_only_the_subset():
  cfg, model, params = helpers.tiny_model(seed=1, lora_rank=2, lora_alpha=4.0, cond_feature_dim=8)
  mask = trainable.trainable_mask(params, "lora+adapter")
  train, frozen = trainable.split(params, mask)
  n_train = len(jax.tree_util.tree_leaves(train))
  assert n_train == 14 + 5
  assert n_train + len(jax.tree_util.tree_leaves(frozen)) == len(jax.tree_util.tree_leaves(params))
  joined = trainable.join(train, frozen)
  assert jax.tree_util.tree_structure(joined) == jax.tree_util.tree_structure(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, joined, params)

  args = model.init_inputs(2, 8)
  args["features"] = jax.random.normal(jax.random.key(2), (2, 8, 8))
  optimizer = optax.sgd(0.1)
  opt_state = optimizer.init(train)
  assert len(jax.tree_util.tree_leaves(opt_state)) <= n_train  # state only for the subset

  def step(train, frozen, opt_state):
    def loss_fn(train):
      logits = model.apply({"params": trainable.join(train, frozen)}, **args)[1]
      return jnp.mean(logits ** 2)
    grads = jax.grad(loss_fn)(train)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(train, updates), opt_state

  new_train, _ = jax.jit(step)(train, frozen, opt_state)
  after = trainable.join(new_train, frozen)
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                 after, params)
  flat = {trainable.path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(moved)[0]}
  assert not any(m for n, m in flat.items() if trainable.group_of(n) == "base")
  assert flat["backbone/layers/mlp/up/lora_b"] and flat["adapter/gate_scale"]


def _base_shapes(**overrides):
  model_cfg = ml_collections.ConfigDict(config_lib.load_config("metis_base").model.to_dict())
  for k, v in overrides.items():
    model_cfg[k] = v
  model = metis.MetisModel(metis.MetisConfig.from_config(model_cfg))
  return jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0)))


def _lora_count(rank, h=1536, ff=6144, layers=16):
  """r (in + out) per adapted map: q, k, v, o (h -> h), gate, up (h -> ff), down (ff -> h)."""
  return layers * rank * (4 * (h + h) + 3 * (h + ff))


def test_metis_base_counts_of_the_released_fine_tunes():
  shapes = _base_shapes(lora_rank=32, lora_alpha=64.0, cond_feature_dim=1024)
  counts = trainable.group_counts(shapes)
  adapter = 1024 * 6144 + 6144 + 6144 * 1536 + 1536 + 1
  assert counts == {"base": 725_944_832, "lora": _lora_count(32), "adapter": adapter}
  assert (_lora_count(32), adapter) == (18_087_936, 15_736_321)
  table = trainable.report(shapes, trainable.trainable_mask(shapes, "lora+adapter"))
  lines = table.splitlines()
  assert lines[1].split() == ["base", "725.9M", "no"]
  assert lines[2].split() == ["lora", "18.1M", "yes"]
  assert lines[3].split() == ["adapter", "15.7M", "yes"]
  assert lines[-1].split() == ["trainable", "33.8M"]

  r16 = _base_shapes(lora_rank=16, lora_alpha=32.0)
  assert trainable.group_counts(r16)["lora"] == _lora_count(16) == 9_043_968
  assert "9.0M" in trainable.report(r16, trainable.trainable_mask(r16, "lora")).splitlines()[2]
