"""Sharded training equals unsharded training; the sharding plan is frozen in a golden file."""

import os

import jax
import numpy as np
import pytest

from metis_jax import config_lib
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import state as train_state
from tests.train_testlib import REFERENCE_MESH, run_steps

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "metis_base_partition_specs.txt")


@pytest.mark.slow
def test_eight_devices_data_fsdp_tensor_match_one_device():
  one, params_one, _, _ = run_steps()
  eight, params_eight, created, _ = run_steps(REFERENCE_MESH, 8)
  assert dict(created["embedding"].mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  for a, b in zip(one, eight):
    assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"])
    assert a["scored_tokens"] == b["scored_tokens"]
  assert one[0]["loss"] != one[-1]["loss"]  # the steps did update the model
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), params_one, params_eight)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch():
  full, params_full, _, _ = run_steps()
  accum, params_accum, _, _ = run_steps(("train.grad_accum_steps=4",))
  for a, b in zip(full, accum):
    assert abs(a["loss"] - b["loss"]) < 1e-5
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, a["grad_norm"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), params_full, params_accum)


@pytest.mark.slow
def test_state_is_created_sharded_by_the_logical_rules():
  _, _, created, _ = run_steps(REFERENCE_MESH, 8)
  # token_embed [vocab 64, embed 32] -> (tensor, fsdp): each device holds [32, 16].
  assert created["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert created["shards"] == {(32, 16)}
  assert created["mu"] == created["embedding"]  # optimizer moments follow their parameter


def base_partition_specs() -> str:
  config = config_lib.load_config("metis_base", list(REFERENCE_MESH))
  setup = train_state.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:8])
  specs = train_state.param_partition_specs(setup, mesh)
  header = ("# PartitionSpec of every parameter of configs/metis_base.py on the mesh data=2 fsdp=2 "
            "tensor=2.\n# Regenerate deliberately: METIS_UPDATE_GOLDEN=1 python -m pytest "
            "tests/test_train_sharding.py -k golden\n")
  return header + "".join(f"{path}\t{spec}\n" for path, spec in sorted(specs.items()))


def test_golden_partition_specs_of_the_base_config():
  actual = base_partition_specs()
  if os.environ.get("METIS_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      f.write(actual)
    pytest.skip(f"rewrote {GOLDEN}")
  with open(GOLDEN) as f:
    expected = f.read()
  if actual != expected:
    exp, act = set(expected.splitlines()), set(actual.splitlines())
    diff = [f"- {line}" for line in sorted(exp - act)] + [f"+ {line}" for line in sorted(act - exp)]
    pytest.fail("the sharding plan of metis_base changed:\n" + "\n".join(diff) +
                "\nIf intended, regenerate: METIS_UPDATE_GOLDEN=1 python -m pytest "
                "tests/test_train_sharding.py -k golden")
