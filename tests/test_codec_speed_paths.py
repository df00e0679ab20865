"""The codecs' fast lowerings give what the plain formulations give.

- `conv.depthwise_conv1d` (shifted multiply-adds) against a numpy loop over taps,
  and `Conv1d(groups=channels)` against the grouped `conv_general_dilated`.
- `quantizer.first_argmin` (blocked) against numpy's argmin, ties and NaN included, and
  `nearest_code`'s NaN rule (decided on the latents and codes) against argmin of the table.
- `vocos.gelu_erf` against the float64 erf formula.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.nn import conv
from metis_jax.nn import quantizer as vq
from metis_jax.nn import vocos


def _depthwise_reference(x, kernel, padding, dilation):
  """numpy float64: out[b, t, o] = sum_j xpad[b, t + j * dilation, o // m] * kernel[j, 0, o]."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  taps, _, features = kernel.shape
  m = features // x.shape[-1]
  xp = np.pad(x, [(0, 0), (padding, padding), (0, 0)])
  out_len = xp.shape[1] - dilation * (taps - 1)
  out = np.zeros((x.shape[0], out_len, features))
  for o in range(features):
    for j in range(taps):
      out[:, :, o] += xp[:, j * dilation:j * dilation + out_len, o // m] * kernel[j, 0, o]
  return out


@pytest.mark.parametrize("taps,padding,dilation,multiplier", [(7, 3, 1, 1), (3, 3, 3, 1), (5, 0, 1, 2), (1, 0, 1, 1)])
def test_depthwise_conv_matches_a_loop_over_taps(taps, padding, dilation, multiplier):
  rng = np.random.default_rng(0)
  c = 6
  x = rng.standard_normal((2, 11, c)).astype(np.float32)
  kernel = rng.standard_normal((taps, 1, c * multiplier)).astype(np.float32)
  got = np.asarray(jax.jit(conv.depthwise_conv1d, static_argnums=(2, 3))(x, kernel, padding, dilation))
  want = _depthwise_reference(x, kernel, padding, dilation)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depthwise_conv1d_module_equals_the_grouped_convolution():
  c = 8
  layer = conv.Conv1d(c, 7, padding=3, groups=c)
  x = jax.random.normal(jax.random.key(0), (2, 13, c))
  params = nn.unbox(layer.init(jax.random.key(1), x))
  params = jax.tree_util.tree_map(lambda p: p + 0.3, params)  # non-zero bias
  got = layer.apply(params, x)
  p = params["params"]
  want = jax.lax.conv_general_dilated(x, p["kernel"], (1,), [(3, 3)], dimension_numbers=("NWC", "WIO", "NWC"),
                                      feature_group_count=c, precision=jax.lax.Precision.HIGHEST) + p["bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [64, 256, 1024, 300])
def test_first_argmin_equals_numpy_argmin_with_ties_and_nan(k):
  rng = np.random.default_rng(k)
  x = rng.integers(0, 7, size=(3, 9, k)).astype(np.float32)  # many exact ties
  x[0, 0] = 5.0
  x[0, 0, [k - 1, k // 2, 3]] = -1.0                           # ties across blocks: the first wins
  x[1, 1, k // 3] = np.nan                                      # NaN counts as the minimum
  x[1, 2, [k - 2, 2]] = np.nan
  got = np.asarray(jax.jit(vq.first_argmin)(x))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.argmin(x, axis=-1))
  assert got[0, 0] == 3 and got[1, 1] == k // 3 and got[1, 2] == 2


def test_nearest_code_agrees_with_a_numpy_cosine_search():
  rng = np.random.default_rng(1)
  e = rng.standard_normal((2, 50, 8)).astype(np.float32)
  c = rng.standard_normal((1024, 8)).astype(np.float32)
  en = e / np.linalg.norm(e.astype(np.float64), axis=-1, keepdims=True)
  cn = c / np.linalg.norm(c.astype(np.float64), axis=-1, keepdims=True)
  want = np.argmax(en @ cn.T, axis=-1)  # random data: no near-ties at float32 resolution
  np.testing.assert_array_equal(np.asarray(vq.nearest_code(e, c)), want)


def _plain_nearest_code(e, c):
  """The search as written in the original: argmin of |e|^2 - 2 e.c + |c|^2 over normalized rows."""
  e, c = vq.l2_normalize(jnp.asarray(e)), vq.l2_normalize(jnp.asarray(c))
  dot = jnp.einsum("...d,kd->...k", e, c, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(jnp.square(e), -1, keepdims=True) - 2.0 * dot + jnp.sum(jnp.square(c), -1)
  return np.asarray(jnp.argmin(dist, axis=-1))


def test_nearest_code_nan_rule_without_scanning_the_distance_table():
  """NaN/inf latents give code 0, NaN codebook rows win from the first one (argmin's NaN rule)."""
  rng = np.random.default_rng(2)
  e = rng.standard_normal((2, 40, 8)).astype(np.float32)
  c = rng.standard_normal((1024, 8)).astype(np.float32)
  e[0, 3, 2] = np.nan
  e[1, 7, 0] = np.inf
  e[1, 8] = 0.0                       # zero vector: normalized to 0, a finite distance
  e[0, 9, :] = 3e25                   # |e|^2 overflows: normalized to 0, no NaN
  search = jax.jit(vq.nearest_code)
  got = np.asarray(search(e, c))
  np.testing.assert_array_equal(got, _plain_nearest_code(e, c))
  assert got[0, 3] == 0 and got[1, 7] == 0
  c[[700, 300], 1] = np.nan
  got = np.asarray(search(e, c))
  np.testing.assert_array_equal(got, _plain_nearest_code(e, c))
  nan_latent = np.zeros(got.shape, bool)
  nan_latent[0, 3] = nan_latent[1, 7] = True
  assert (got[~nan_latent] == 300).all() and (got[nan_latent] == 0).all()


def test_gelu_erf_is_the_exact_gelu():
  x = np.linspace(-12.0, 12.0, 4001).astype(np.float32)
  want = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
  got = np.asarray(jax.jit(vocos.gelu_erf)(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  big = np.abs(want) > 0.1  # away from the negative tail, where 1 + erf cancels (as in PyTorch)
  np.testing.assert_allclose(got[big], want[big], rtol=1e-5)
