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
  if jax.default_backend() in ("cpu", "gpu"):
    assert attention.choose_implementation(None, jnp.bfloat16) == ("cudnn" if on_gpu else None)
    assert attention.choose_implementation("", jnp.float16) == ("cudnn" if on_gpu else None)
    # cuDNN's fused kernel has no float32 variant: JAX chooses.
    assert attention.choose_implementation(None, jnp.float32) is None


@pytest.mark.parametrize("backend,dtype,expected", [
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, None),
    ("tpu", jnp.bfloat16, "splash"), ("tpu", jnp.float32, "splash"),
    ("cpu", jnp.bfloat16, None), ("cpu", jnp.float32, None)])
def test_kernel_selection_per_backend(backend, dtype, expected):
  chosen = attention.choose_implementation(None, dtype, backend)
  assert chosen == expected
  # Fused kernels take key lengths, so the model packs rows for them; XLA takes the mask.
  assert attention.takes_lengths(chosen) == (expected is not None)


def test_unknown_kernel_request_is_an_error():
  with pytest.raises(ValueError, match="flash"):
    attention.choose_implementation("flash", jnp.bfloat16)


def _packed_qkv(batch, length, heads, head_dim, lengths, dtype=jnp.float32):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
             for _ in range(3))
  return q, k, v, jnp.asarray(lengths, jnp.int32)


@pytest.mark.slow
def test_splash_kernel_equals_xla_on_packed_rows_interpreted():
  """The TPU splash kernel (Pallas interpreter on CPU) against XLA's attention on valid rows."""
  lengths = np.array([100, 37])
  q, k, v, kv_lengths = _packed_qkv(2, 100, 2, 128, lengths)  # 100: padded to 128 inside
  splash = attention.splash_attention(q, k, v, kv_lengths, interpret=True)
  xla = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)
  rows = (np.arange(100)[None] < lengths[:, None])[..., None, None]
  assert np.all(np.isfinite(np.asarray(splash)))
  np.testing.assert_allclose(np.where(rows, np.asarray(splash), 0), np.where(rows, np.asarray(xla), 0),
                             atol=2e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU")
def test_cudnn_length_mask_equals_xla_mask_on_packed_rows():
  """cuDNN with key lengths (bf16) against XLA with the boolean mask, valid rows, forward and gradient."""
  lengths = np.array([64, 23])
  q, k, v, kv_lengths = _packed_qkv(2, 64, 4, 64, lengths, jnp.bfloat16)
  mask = jnp.asarray(np.arange(64)[None] < lengths[:, None])[:, None, None, :]
  rows = jnp.asarray(np.arange(64)[None] < lengths[:, None])[..., None, None]

  def run(impl):
    def f(q, k, v):
      kw = dict(key_value_seq_lengths=kv_lengths) if impl == "cudnn" else dict(mask=mask)
      out = jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw)
      return jnp.sum(jnp.where(rows, out.astype(jnp.float32), 0) ** 2), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]

  out_cudnn, grads_cudnn = run("cudnn")
  out_xla, grads_xla = run("xla")
  valid = np.asarray(rows)
  err = np.max(np.abs(np.where(valid, out_cudnn - out_xla, 0)))
  assert err / np.max(np.abs(out_xla)) < 2e-2
  for a, b in zip(grads_cudnn, grads_xla):
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU")
def test_packed_cudnn_model_equals_xla_model_with_gaps():
  """A bf16 Metis with phone padding: packed rows through cuDNN vs the unpacked XLA path."""
  import dataclasses
  from metis_jax.models import metis
  from metis_jax.nn import transformer
  backbone = transformer.BackboneConfig(hidden_size=128, num_layers=2, num_heads=2, dtype="bfloat16")
  cfg = metis.MetisConfig(backbone=backbone, vocab_size=64, use_phone_cond=True,
                          phone_vocab_size=16, phone_pad_id=15)
  params = metis.init_params(metis.MetisModel(cfg), jax.random.key(0))
  rng = np.random.default_rng(2)
  valid = np.arange(48)[None] < np.array([[48], [30]])
  phone_valid = np.arange(8)[None] < np.array([[5], [8]])
  args = dict(tokens=jnp.asarray(rng.integers(0, 64, (2, 48)), jnp.int32),
              is_masked=jnp.asarray(rng.random((2, 48)) < 0.5), valid=jnp.asarray(valid),
              t=jnp.asarray([0.5, 0.9]), phones=jnp.asarray(rng.integers(0, 15, (2, 8)), jnp.int32),
              phone_valid=jnp.asarray(phone_valid))
  outs = {}
  for impl, pack in (("cudnn", None), ("xla", False)):
    bb = dataclasses.replace(backbone, attention_impl=impl, pack_rows=pack)
    model = metis.MetisModel(dataclasses.replace(cfg, backbone=bb))
    assert bb.packs_rows() == (impl == "cudnn")
    _, logits = jax.jit(model.apply)({"params": params}, **args)
    outs[impl] = np.asarray(logits, np.float32)
  rows = valid[..., None]
  err = np.max(np.abs(np.where(rows, outs["cudnn"] - outs["xla"], 0)))
  assert err / np.max(np.abs(outs["xla"])) < 5e-2


@pytest.mark.gpu
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
