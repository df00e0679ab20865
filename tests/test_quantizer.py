"""Factorized VQ and residual VQ: search, straight-through, losses, dropout, restarts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.nn import conv
from metis_jax.nn import quantizer as vq

D, K, d = 16, 32, 4


def _rvq(n=3, dropout=0.0, weight_norm=False):
  return vq.ResidualVQ(D, n, K, d, commitment=0.25, codebook_loss_weight=1.0,
                       quantizer_dropout=dropout, weight_norm=weight_norm)


def _random_params(model, *args, seed=0):
  """Random values in the model's parameter shapes (eval_shape: no slow initializer compile)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [(rng.standard_normal(x.shape) / np.sqrt(x.shape[-2] if x.ndim > 2 else 1)).astype(np.float32)
                for x in leaves])


def _jit(model, method=None, static_argnames=()):
  return jax.jit(functools.partial(model.apply, method=method), static_argnames=static_argnames)


def _init(model, batch=2, length=5, seed=0):
  z = jax.random.normal(jax.random.key(seed + 100), (batch, length, D))
  return _random_params(model, z, seed=seed), z


def test_nearest_code_is_max_cosine_and_z_q_is_the_raw_row():
  rng = np.random.default_rng(0)
  lat = rng.standard_normal((50, d)).astype(np.float32)
  # Codebook rows with very different norms: a plain Euclidean search would differ.
  cb = (rng.standard_normal((K, d)) * rng.uniform(0.1, 10, (K, 1))).astype(np.float32)
  got = np.asarray(vq.nearest_code(jnp.asarray(lat), jnp.asarray(cb)))
  cos = (lat / np.linalg.norm(lat, axis=1, keepdims=True)) @ (cb / np.linalg.norm(cb, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(got, cos.argmax(1))
  euclid = ((lat[:, None] - cb[None]) ** 2).sum(-1).argmin(1)
  assert (euclid != got).any()

  layer = vq.FactorizedVQ(D, K, d)
  z = jax.random.normal(jax.random.key(1), (2, 7, D))
  params = _random_params(layer, z)
  out = _jit(layer)({"params": params}, z)
  raw = params["codebook"][out.codes]  # not normalized
  expected = layer.apply({"params": params}, raw, method=lambda m, x: m.out_project(x))
  np.testing.assert_allclose(out.quantized, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.quantized, layer.apply({"params": params}, out.codes,
                                                        method=vq.FactorizedVQ.embed_codes),
                             rtol=1e-5, atol=1e-5)


def test_straight_through_and_loss_gradients():
  layer = vq.FactorizedVQ(D, K, d, commitment=0.25, codebook_loss_weight=1.0)
  z = jax.random.normal(jax.random.key(1), (2, 7, D))
  params = _random_params(layer, z)
  r = jax.random.normal(jax.random.key(2), (2, 7, D))

  def through(zz):
    return jnp.sum(layer.apply({"params": params}, zz).quantized * r)

  def identity_path(zz):  # out_project(in_project(z)): what the straight-through gradient sees
    return jnp.sum(layer.apply({"params": params}, zz,
                               method=lambda m, x: m.out_project(m.in_project(x))) * r)

  np.testing.assert_allclose(jax.jit(jax.grad(through))(z), jax.jit(jax.grad(identity_path))(z),
                             rtol=1e-5, atol=1e-6)

  out = _jit(layer)({"params": params}, z)
  z_q = params["codebook"][out.codes]
  np.testing.assert_allclose(out.commit_loss, 0.25 * np.mean((out.z_e - z_q) ** 2, axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(out.codebook_loss, np.mean((out.z_e - z_q) ** 2, axis=(1, 2)), rtol=1e-5)

  def loss(p, which):
    o = layer.apply({"params": p}, z)
    return jnp.sum(getattr(o, which))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_commit = grad(params, "commit_loss")
  g_book = grad(params, "codebook_loss")
  assert float(jnp.abs(g_commit["codebook"]).max()) == 0.0  # commitment trains the encoder only
  assert float(jnp.abs(g_commit["in_project"]["kernel"]).max()) > 0.0
  assert float(jnp.abs(g_book["in_project"]["kernel"]).max()) == 0.0  # codebook loss trains codes only
  assert float(jnp.abs(g_book["codebook"]).max()) > 0.0


def test_residual_update_and_vq2emb():
  model = _rvq(n=3)
  params, z = _init(model)
  apply = _jit(model, static_argnames="n_quantizers")
  out = apply({"params": params}, z)
  assert out.codes.shape == (2, 5, 3)
  # Layer i quantizes the residual left by layers < i (whatever the mask).
  residual = z
  total = 0
  single = _jit(vq.FactorizedVQ(D, K, d))
  for i in range(3):
    o = single({"params": params[f"layers_{i}"]}, residual)
    np.testing.assert_array_equal(o.codes, out.codes[..., i])
    residual = residual - o.quantized
    total = total + o.quantized
  np.testing.assert_allclose(out.quantized, total, rtol=1e-5, atol=1e-5)
  vq2emb = _jit(model, vq.ResidualVQ.vq2emb)
  emb = vq2emb({"params": params}, out.codes)
  np.testing.assert_allclose(emb, out.quantized, rtol=1e-4, atol=1e-5)
  # Fewer layers at inference: the first n.
  two = apply({"params": params}, z, n_quantizers=2)
  np.testing.assert_array_equal(two.codes, out.codes[..., :2])
  emb2 = vq2emb({"params": params}, out.codes[..., :2])
  np.testing.assert_allclose(two.quantized, emb2, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError):
    model.apply({"params": params}, z, n_quantizers=4)


@pytest.mark.slow
def test_quantizer_dropout_uses_1_to_n_layers_on_the_first_half():
  n, batch = 12, 8
  model = _rvq(n=n, dropout=0.5)
  params, z = _init(model, batch=batch, length=3)
  full = _jit(model)({"params": params}, z)
  single = _jit(vq.FactorizedVQ(D, K, d))
  seen = set()
  apply = jax.jit(lambda p, key: model.apply({"params": p}, z, train=True, rngs={"dropout": key}))
  for seed in range(40):
    out = apply(params, jax.random.key(seed))
    kept = np.asarray(out.layer_mask).sum(-1)
    assert (kept[batch // 2:] == n).all()
    assert ((kept[:batch // 2] >= 1) & (kept[:batch // 2] <= n)).all()
    # A prefix of layers, never a gap.
    np.testing.assert_array_equal(np.asarray(out.layer_mask), np.arange(n)[None] < kept[:, None])
    seen.update(kept[:batch // 2].tolist())
    # All codes are computed as without dropout.
    np.testing.assert_array_equal(out.codes, full.codes)
  assert seen == set(range(1, n + 1)), seen
  # Item b's sum keeps exactly its first kept[b] layer outputs.
  out = apply(params, jax.random.key(3))
  kept = np.asarray(out.layer_mask).sum(-1)
  residual, outs = z, []
  for i in range(n):
    o = single({"params": params[f"layers_{i}"]}, residual)
    residual = residual - o.quantized
    outs.append(o)
  for b in range(batch):
    expected = sum(outs[i].quantized[b] for i in range(kept[b]))
    np.testing.assert_allclose(out.quantized[b], expected, rtol=1e-4, atol=1e-5)
  # Losses: per layer, batch mean with dropped items counted as zero.
  for i in range(n):
    m = (i < kept).astype(np.float32)
    np.testing.assert_allclose(out.commit_loss[i], np.mean(np.asarray(outs[i].commit_loss) * m), rtol=1e-5)


def test_valid_mask_excludes_padding_from_losses():
  model = _rvq(n=2)
  params, z = _init(model, batch=2, length=6)
  valid = jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
  apply = _jit(model)
  out = apply({"params": params}, z, valid)
  alone = apply({"params": params}, z[:1, :4])
  np.testing.assert_allclose(out.commit_loss[0] * 2 - alone.commit_loss[0],
                             apply({"params": params}, z[1:]).commit_loss[0], rtol=1e-5)


def test_weight_norm_conv_equals_folded_kernel():
  x = jax.random.normal(jax.random.key(0), (2, 9, 3))
  wn = conv.Conv1d(5, 3, padding=1, weight_norm=True)
  params = nn.unbox(wn.init(jax.random.key(1), x)["params"])
  np.testing.assert_allclose(params["kernel_g"], np.linalg.norm(params["kernel_v"].reshape(-1, 5), axis=0), rtol=1e-6)
  params = dict(params, kernel_g=jnp.arange(1.0, 6.0))
  folded = conv.weight_norm_kernel(params["kernel_v"], params["kernel_g"])
  plain = conv.Conv1d(5, 3, padding=1)
  np.testing.assert_allclose(wn.apply({"params": params}, x),
                             plain.apply({"params": {"kernel": folded, "bias": params["bias"]}}, x),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(folded).reshape(-1, 5), axis=0), np.arange(1.0, 6.0),
                             rtol=1e-5)


def test_usage_perplexity_and_dead_code_restart():
  codes = jnp.array([[[0, 1], [0, 2], [3, 2]]])  # [1, 3, 2]
  counts = vq.codebook_usage(codes, 4)
  np.testing.assert_array_equal(counts, [[2, 0, 0, 1], [0, 1, 2, 0]])
  np.testing.assert_allclose(vq.perplexity(jnp.array([1.0, 1.0, 0.0, 0.0])), 2.0, rtol=1e-5)
  cb = jnp.arange(8.0).reshape(4, 2)
  candidates = jnp.full((5, 2), -1.0)
  new, n_dead = vq.restart_dead_codes(cb, counts[0], candidates, jax.random.key(0))
  assert int(n_dead) == 2
  np.testing.assert_array_equal(new[jnp.array([0, 3])], cb[jnp.array([0, 3])])
  np.testing.assert_array_equal(new[jnp.array([1, 2])], -1.0)


@pytest.mark.slow
def test_data_codebooks_are_drawn_layer_by_layer_from_valid_latents():
  """Each layer's rows are (noisy) projected latents of that layer's residual, valid frames only."""
  model = _rvq(n=3)
  params, z = _init(model, batch=2, length=6)
  z = z * 0.01  # a fresh encoder's scale, far below N(0, 1) codebook rows
  valid = jnp.array([[True] * 6, [True] * 2 + [False] * 4])
  books = jax.jit(functools.partial(model.apply, method=vq.ResidualVQ.data_codebooks))(
      {"params": params}, z, valid, jax.random.key(3), 0.0)
  assert books.shape == (3, K, d)

  # Replay the stack with the drawn codebooks: layer i's candidates are its z_e of valid frames.
  drawn = jax.tree.map(lambda x: x, params)
  for i in range(3):
    drawn[f"layers_{i}"]["codebook"] = books[i]
  out = model.apply({"params": drawn}, z, valid)
  for i in range(3):
    cands = np.asarray(out.z_e[i])[np.asarray(valid)]  # [8 valid frames, d]
    dist = np.min(np.linalg.norm(np.asarray(books[i])[:, None] - cands[None], axis=-1), axis=1)
    np.testing.assert_allclose(dist, 0.0, atol=1e-6)  # every row is a valid frame's z_e (noise 0)
    # The codes now sit at the latents' scale: the commitment loss is small, not ~1.
    assert float(out.commit_loss[i]) < 0.25 * 0.1 * float(np.mean(np.square(cands)))

  # Noise tells repeated draws apart, relative to each row's size.
  noisy = model.apply({"params": params}, z, valid, jax.random.key(3), 0.01,
                      method=vq.ResidualVQ.data_codebooks)
  rel = np.linalg.norm(noisy[0] - books[0], axis=-1) / np.linalg.norm(books[0], axis=-1)
  assert 0.0 < rel.max() < 0.05
  assert len(np.unique(np.round(np.asarray(noisy[0]), 7), axis=0)) == K
