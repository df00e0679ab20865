"""Attention kernel choice, and the fused cuDNN kernel against the XLA one (the latter on a GPU only).

CI has no GPU; on a machine with one, run
  JAX_PLATFORMS=cuda XLA_FLAGS= python -m pytest -q tests/test_attention_kernels.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.nn import attention


def test_explicit_kernel_request_wins():
  assert attention.choose_implementation("xla", jnp.bfloat16) == "xla"
  assert attention.choose_implementation("cudnn", jnp.float32) == "cudnn"


def test_default_kernel_depends_on_backend_and_dtype():
  on_gpu = jax.default_backend() == "gpu"
  assert attention.choose_implementation(None, jnp.bfloat16) == ("cudnn" if on_gpu else None)
  assert attention.choose_implementation("", jnp.float16) == ("cudnn" if on_gpu else None)
  # cuDNN's fused kernel has no float32 variant: JAX chooses.
  assert attention.choose_implementation(None, jnp.float32) is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU")
@pytest.mark.parametrize("gap", [False, True])
def test_cudnn_kernel_equals_xla_kernel_with_padding(gap):
  """Same outputs on valid rows, with key padding at the end or in the middle (phone padding)."""
  batch, length, heads, embed = 2, 64, 4, 128
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, length, embed)), jnp.bfloat16)
  valid = np.ones((batch, length), bool)
  valid[1, 40:] = False
  if gap:
    valid[0, 10:20] = False
  positions = jnp.asarray(np.cumsum(valid, axis=1) - 1, jnp.int32)
  mask = jnp.asarray(valid)[:, None, None, :]
  outs = {}
  params = None
  for impl in ("xla", "cudnn"):
    layer = attention.SelfAttention(heads, implementation=impl, dtype=jnp.bfloat16)
    if params is None:
      params = layer.init(jax.random.key(0), x, positions, mask)
    outs[impl] = np.asarray(jax.jit(layer.apply)(params, x, positions, mask), np.float32)
  rows = valid[..., None]
  err = np.max(np.abs(np.where(rows, outs["cudnn"] - outs["xla"], 0.0)))
  assert err / np.max(np.abs(outs["xla"])) < 2e-2  # bfloat16 rounding, different summation order
