"""Omni fine-tuning: on rows without a frame-level condition (TTS) the adapter adds exactly 0.

The fine-tune objective's model inputs (`finetune_objective.loss_rows`) carry
`condition_rows` for an Omni batch; the expectation is built independently:
the model with its adapter's output layer zeroed (an adapter that adds 0 by
construction) on the TTS row, and the model without `condition_rows` on the
others.
"""

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax import config_lib
from metis_jax.data import tasks
from metis_jax.models import metis
from metis_jax.training import finetune_objective as fto
from tests.test_decode_units import random_params_like

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.vocab_size=64",
        "finetune.base=/unused", "train.seq_length=24", "finetune.phone_length=8"]
ROW_TASKS = ("se", "tts", "vc")  # Row 1 has no frame-level condition.


def omni_setup():
  config = config_lib.load_config("configs/finetune_tiny.py:omni", TINY)
  return fto.make_setup(config, with_encoder=False)


def omni_batch(length: int = 24, phones: int = 8) -> dict[str, np.ndarray]:
  """Three rows as `data.tasks.collate` makes them: a TTS row has zero features and cond length 0."""
  rng = np.random.default_rng(0)
  b = len(ROW_TASKS)
  feats = rng.standard_normal((b, length, fto.CHEAP_DIM)).astype(np.float32)
  feats[1] = 0.0
  return {"tokens": rng.integers(0, 64, (b, length)).astype(np.int32), "valid": np.ones((b, length), bool),
          "prompt_lengths": np.array([0, 6, 6], np.int32),
          "task": np.array([tasks.TASKS.index(t) for t in ROW_TASKS], np.int32),
          "cond_features": feats, "cond_lengths": np.array([length, 0, length], np.int32),
          "phones": rng.integers(0, 50, (b, phones)).astype(np.int32), "phone_valid": np.ones((b, phones), bool)}


def trained_like_params(setup):
  """Random parameters with non-zero adapter biases (as after training; the init's are 0)."""
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(setup.model, jax.random.key(0))), 0)
  rng = np.random.default_rng(1)
  adapter = params["adapter"]
  for layer in ("in_linear", "out_linear"):
    adapter[layer]["bias"] = rng.standard_normal(adapter[layer]["bias"].shape).astype(np.float32)
  return dict(params, adapter=adapter)


def hidden(setup, params, rows):
  """`[B, T, H]` hidden states of the fine-tuned model on `loss_rows`' inputs."""
  inputs = {k: rows[k] for k in ("features", "condition_rows", "phones", "phone_valid") if k in rows}
  c = rows["corruption"]
  return setup.model.apply({"params": params}, rows["tokens"], c.is_masked, rows["valid"], c.t,
                           method=metis.MetisModel.hidden_states, **inputs)


def test_adapter_adds_exactly_zero_on_tts_rows_of_an_omni_batch():
  setup = omni_setup()
  params = trained_like_params(setup)
  # The same model with an adapter that adds 0 by construction (output layer zeroed).
  silent = dict(params, adapter=dict(params["adapter"], out_linear=jax.tree.map(np.zeros_like,
                                                                               params["adapter"]["out_linear"])))

  @jax.jit
  def run(params, silent, batch):
    corruption, seq_valid, dropped = fto.sample_finetune_mask(jax.random.key(3), batch["valid"],
                                                              batch["prompt_lengths"], setup.masking, 0.0)
    rows = fto.loss_rows(setup, None, batch, corruption, seq_valid, dropped)
    without_rows = {k: v for k, v in rows.items() if k != "condition_rows"}
    tts = lambda tree: jax.tree.map(lambda x: x[1:2], tree)
    return {"condition_rows": rows["condition_rows"], "got": hidden(setup, params, rows),
            "no_adapter": hidden(setup, silent, without_rows), "plain": hidden(setup, params, without_rows),
            "loss_tts": fto.finetune_loss(setup.model, params, tts(rows))[0],
            "loss_silent": fto.finetune_loss(setup.model, silent, tts(without_rows))[0]}

  out = jax.tree.map(np.asarray, run(params, silent, omni_batch()))
  np.testing.assert_array_equal(out["condition_rows"], [True, False, True])
  # TTS row: exactly the model whose adapter adds 0; the conditioned rows: unchanged.
  np.testing.assert_array_equal(out["got"][1], out["no_adapter"][1])
  np.testing.assert_array_equal(out["got"][[0, 2]], out["plain"][[0, 2]])
  # The check can fail: zero features through the adapter's biases do move the TTS row.
  assert np.abs(out["plain"][1] - out["no_adapter"][1]).max() > 1e-3
  # The loss sees the same: the TTS row's loss is the silent-adapter model's.
  assert out["loss_tts"] == out["loss_silent"]


def test_single_task_fine_tunes_pass_no_condition_rows():
  config = config_lib.load_config("configs/finetune_tiny.py:se", TINY)
  setup = fto.make_setup(config, with_encoder=False)
  assert fto.condition_rows(setup, omni_batch()) is None
