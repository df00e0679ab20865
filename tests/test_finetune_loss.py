"""The fine-tune loss from hidden states (`finetune_objective.finetune_loss`) equals the full-logits CE.

Reference: `masking.masked_cross_entropy` of the model's float32 `[B, T, vocab]`
logits (what the fine-tune step computed before). The vocabulary (4096) and
the chunk (8 of 40 positions) are chosen so the chunked path really runs. (The
chunked CE's gradient against the full logits' is tests/test_lean_loss.py's.)
"""

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax import config_lib
from metis_jax.models import masking
from metis_jax.models import metis
from metis_jax.training import finetune_objective as fto
from tests.test_decode_units import random_params_like

VOCAB = 4096
TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", f"model.vocab_size={VOCAB}",
        "finetune.base=/unused", "train.seq_length=40"]


def test_finetune_loss_equals_full_logits_cross_entropy():
  assert VOCAB >= masking.MIN_CHUNKED_VOCAB
  config = config_lib.load_config("configs/finetune_tiny.py:se", TINY)
  setup = fto.make_setup(config, with_encoder=False)
  model = setup.model
  params = random_params_like(jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0))), 0)
  rng = np.random.default_rng(0)
  b, t = 3, 40
  valid = np.arange(t)[None] < np.array([[40], [31], [22]])
  batch = {"tokens": rng.integers(0, VOCAB, (b, t)).astype(np.int32), "valid": valid,
           "prompt_lengths": np.array([0, 5, 9], np.int32),
           "cond_features": rng.standard_normal((b, t, fto.CHEAP_DIM)).astype(np.float32),
           "cond_lengths": valid.sum(-1).astype(np.int32)}

  def both(params, batch):
    corruption, seq_valid, dropped = fto.sample_finetune_mask(jax.random.key(1), batch["valid"],
                                                              batch["prompt_lengths"], setup.masking, 0.5)
    rows = fto.loss_rows(setup, None, batch, corruption, seq_valid, dropped)
    ce, acc, count = fto.finetune_loss(model, params, rows, chunk_size=8)
    _, logits = model.apply({"params": params}, rows["tokens"], corruption.is_masked, seq_valid, corruption.t,
                            features=rows["features"])
    return (ce, acc, count), masking.masked_cross_entropy(logits, rows["tokens"], corruption.is_masked & seq_valid)

  (ce, acc, n), (ce_ref, acc_ref, n_ref) = jax.jit(both)(params, batch)
  assert float(n) == float(n_ref) > 10
  np.testing.assert_allclose(float(ce), float(ce_ref), rtol=0, atol=1e-5)
  np.testing.assert_allclose(float(acc), float(acc_ref), rtol=0, atol=1e-6)
