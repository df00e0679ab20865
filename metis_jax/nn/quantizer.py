"""Factorized vector quantization (DAC-style) and its residual stack.

`FactorizedVQ` projects `[batch, time, D]` latents to a small code space
(`in_project`, a 1x1 convolution D -> d), finds for each frame the code whose
*direction* is closest (both the projected latent and the codebook rows are
L2-normalized for the search only: maximum cosine similarity), takes the *raw*
codebook row as z_q, passes gradients straight through (z_e + sg(z_q - z_e))
and projects back (`out_project`, d -> D).

Losses per item (means over time and code dimensions, on unnormalized
vectors): commitment = w_c * mse(z_e, sg(z_q)), codebook = w_b * mse(z_q, sg(z_e)).

Codebooks are N(0, 1) at init, or drawn from data (`ResidualVQ.data_codebooks`:
each layer's rows are random projected latents of that layer, taken layer by
layer down the residual stack, so code and latent scales match from the first
step; the codec trainers use this for the acoustic codec).

`ResidualVQ` applies N of them to successive residuals (r <- r - q_i(r), for
every layer, also the dropped ones) and sums the outputs. Quantizer dropout
(training): the first floor(batch * dropout) items keep n_q ~ U{1..N} layers
in their sum, the others all N; each layer's losses are averaged over the
batch with the dropped items counted as zeros. Codes are `[batch, time, n_q]`.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.parallel import sharding
from metis_jax.nn import conv


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nearest_code(latents: jax.Array, codebook: jax.Array, l2_normalized: bool = True) -> jax.Array:
  """Index of the closest codebook row for each latent.

  latents `[..., d]`, codebook `[K, d]` -> `[...]` int32. The distance is
  computed as in the original (|e|^2 - 2 e.c + |c|^2), in float32 at full
  matmul precision, so ties break the same way.
  """
  e = latents.astype(jnp.float32)
  c = codebook.astype(jnp.float32)
  if l2_normalized:
    e, c = l2_normalize(e), l2_normalize(c)
  dot = jnp.einsum("...d,kd->...k", e, c, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(jnp.square(e), -1, keepdims=True) - 2.0 * dot + jnp.sum(jnp.square(c), -1)
  if not l2_normalized:
    return first_argmin(dist)
  # Normalized rows are bounded (|x| <= 1) or NaN, so dist[..., k] is NaN exactly where the
  # latent or code k is: argmin's NaN rule (the first NaN wins) is decided on the `[...]`
  # and `[K]` flags, and the search skips a NaN scan of the whole `[..., K]` table.
  nan_e = jnp.any(jnp.isnan(e), axis=-1)
  nan_c = jnp.any(jnp.isnan(c), axis=-1)
  idx = first_argmin(dist, nan_free=True)
  idx = jnp.where(jnp.any(nan_c), jnp.argmax(nan_c).astype(jnp.int32), idx)
  return jnp.where(nan_e, 0, idx)


def first_argmin(x: jax.Array, block: int = 128, nan_free: bool = False) -> jax.Array:
  """`jnp.argmin(x, -1)` (the first index of the minimum; NaN counts as smallest), `[..., K]` -> `[...]` int32.

  XLA:CPU runs argmin's (value, index) reduction scalar by scalar (18 ms for
  `[500, 8192]`); here the last axis is cut into blocks of `block`: a plain
  min per block, argmin over the block minima (the first block holding the
  minimum), then argmin inside that block (4 ms). Same index, ties included.
  `x` is materialized once so both passes read the same values. `nan_free`:
  the caller guarantees no NaN (or overrides the result where there is one),
  so the NaN scan of `x` is skipped.
  """
  k = x.shape[-1]
  if k <= block or k % block:
    return jnp.argmin(x, axis=-1).astype(jnp.int32)
  x = jax.lax.optimization_barrier(x).reshape(x.shape[:-1] + (k // block, block))
  block_min = jnp.min(x, axis=-1)  # XLA:CPU's min reduction may drop NaN; argmin must not
  if not nan_free:
    block_min = jnp.where(jnp.any(jnp.isnan(x), axis=-1), jnp.nan, block_min)
  first_block = jnp.argmin(block_min, axis=-1)
  rows = jnp.take_along_axis(x, first_block[..., None, None], axis=-2)[..., 0, :]
  return (first_block * block + jnp.argmin(rows, axis=-1)).astype(jnp.int32)


def _masked_mean(sq: jax.Array, valid: jax.Array | None) -> jax.Array:
  """`[batch, time, d]` -> `[batch]` mean over valid frames and d."""
  if valid is None:
    return jnp.mean(sq, axis=(1, 2))
  v = valid.astype(sq.dtype)
  return jnp.sum(sq * v[..., None], axis=(1, 2)) / jnp.maximum(jnp.sum(v, axis=1) * sq.shape[-1], 1.0)


@flax.struct.dataclass
class VQOutput:
  """One factorized VQ layer.

  quantized: `[batch, time, D]` out-projected straight-through z_q.
  codes: `[batch, time]` int32.
  commit_loss, codebook_loss: `[batch]`, weights applied.
  z_e: `[batch, time, d]` projected latents (for dead-code restarts).
  """
  quantized: jax.Array
  codes: jax.Array
  commit_loss: jax.Array
  codebook_loss: jax.Array
  z_e: jax.Array


class FactorizedVQ(nn.Module):
  """One factorized, L2-normalized-search vector quantizer.

  Attributes:
    input_dim: D, channels of the latents.
    codebook_size: K codes.
    codebook_dim: d, dimension of the code space.
    commitment: weight of the commitment loss.
    codebook_loss_weight: weight of the codebook loss.
    use_l2_normalize: cosine search (True in every released model).
    weight_norm: weight-normalized projections (training parametrization).
  """
  input_dim: int
  codebook_size: int
  codebook_dim: int
  commitment: float = 0.25
  codebook_loss_weight: float = 1.0
  use_l2_normalize: bool = True
  weight_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, weight_norm=self.weight_norm,
              kernel_init=conv.WN_KERNEL_INIT)
    self.in_project = conv.Conv1d(self.codebook_dim, 1, kernel_axes=(None, "conv_in", None), **dt)
    self.out_project = conv.Conv1d(self.input_dim, 1, kernel_axes=(None, None, "conv_out"), **dt)
    self.codebook = self.param("codebook", sharding.partitioned(conv.fast_normal(1.0, truncate=np.inf), ("codebook", None)),
                               (self.codebook_size, self.codebook_dim), self.param_dtype)

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """`[batch, time]` codes -> `[batch, time, D]` (codebook row, out-projected)."""
    return self.out_project(jnp.take(self.codebook, codes, axis=0).astype(self.dtype))

  def project(self, z: jax.Array) -> jax.Array:
    """`[batch, time, D]` latents -> `[batch, time, d]` float32 z_e (in_project)."""
    return self.in_project(z).astype(jnp.float32)

  def embed_rows(self, rows: jax.Array) -> jax.Array:
    """`[batch, time, d]` code-space vectors -> `[batch, time, D]` (out_project)."""
    return self.out_project(rows.astype(self.dtype))

  def __call__(self, z: jax.Array, valid: jax.Array | None = None) -> VQOutput:
    """z `[batch, time, D]`, valid `[batch, time]` (masks the losses) -> VQOutput."""
    z_e = self.project(z)
    codes = nearest_code(z_e, self.codebook, self.use_l2_normalize)
    z_q = jnp.take(self.codebook, codes, axis=0).astype(jnp.float32)
    commit = self.commitment * _masked_mean(jnp.square(z_e - jax.lax.stop_gradient(z_q)), valid)
    codebook = self.codebook_loss_weight * _masked_mean(jnp.square(z_q - jax.lax.stop_gradient(z_e)), valid)
    z_st = z_e + jax.lax.stop_gradient(z_q - z_e)
    quantized = self.out_project(z_st.astype(self.dtype))
    return VQOutput(quantized, codes, commit, codebook, z_e)


@flax.struct.dataclass
class RVQOutput:
  """The residual stack.

  quantized: `[batch, time, D]` sum of the kept layers' outputs.
  codes: `[batch, time, n_q]` int32 (every computed layer).
  commit_loss, codebook_loss: `[n_q]` per-layer batch means (dropped items 0).
  layer_mask: `[batch, n_q]` bool, which layers each item's sum kept.
  z_e: `[n_q, batch, time, d]` projected latents of every layer.
  """
  quantized: jax.Array
  codes: jax.Array
  commit_loss: jax.Array
  codebook_loss: jax.Array
  layer_mask: jax.Array
  z_e: jax.Array


def dropout_num_quantizers(rng: jax.Array, batch: int, num_quantizers: int, dropout: float) -> jax.Array:
  """`[batch]` layers kept: the first floor(batch * dropout) draw U{1..N}, the rest N."""
  n_drop = int(batch * dropout)
  drawn = jax.random.randint(rng, (batch,), 1, num_quantizers + 1)
  return jnp.where(jnp.arange(batch) < n_drop, drawn, num_quantizers).astype(jnp.int32)


class ResidualVQ(nn.Module):
  """N FactorizedVQ layers on successive residuals.

  Attributes:
    input_dim, codebook_size, codebook_dim, commitment, codebook_loss_weight,
    use_l2_normalize, weight_norm: as in FactorizedVQ (shared by all layers).
    num_quantizers: N layers.
    quantizer_dropout: fraction of each training batch with random depth.
  """
  input_dim: int
  num_quantizers: int
  codebook_size: int
  codebook_dim: int
  commitment: float = 0.25
  codebook_loss_weight: float = 1.0
  quantizer_dropout: float = 0.0
  use_l2_normalize: bool = True
  weight_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.layers = [
        FactorizedVQ(self.input_dim, self.codebook_size, self.codebook_dim, self.commitment,
                     self.codebook_loss_weight, self.use_l2_normalize, self.weight_norm,
                     self.dtype, self.param_dtype)
        for _ in range(self.num_quantizers)]

  def __call__(self, z: jax.Array, valid: jax.Array | None = None, n_quantizers: int | None = None,
               train: bool = False) -> RVQOutput:
    """Quantizes `[batch, time, D]` latents.

    Args:
      z: latents.
      valid: optional `[batch, time]` bool; padding frames are left out of the
        losses (their codes are computed but meaningless).
      n_quantizers: with train=False, use only the first n layers (static).
      train: quantizer dropout (needs the 'dropout' rng when
        quantizer_dropout > 0); all N layers are computed.
    """
    batch = z.shape[0]
    n_layers = self.num_quantizers if (train or n_quantizers is None) else int(n_quantizers)
    if not 1 <= n_layers <= self.num_quantizers:
      raise ValueError(f"n_quantizers {n_layers} is not in 1..{self.num_quantizers}")
    if train and self.quantizer_dropout > 0:
      kept = dropout_num_quantizers(self.make_rng("dropout"), batch, self.num_quantizers,
                                    self.quantizer_dropout)
    else:
      kept = jnp.full((batch,), n_layers, jnp.int32)
    z = sharding.constrain(z.astype(jnp.float32), sharding.BATCH_LENGTH_EMBED)
    residual, quantized = z, jnp.zeros_like(z)
    codes, commits, books, masks, z_es = [], [], [], [], []
    for i in range(n_layers):
      out = self.layers[i](residual, valid)
      q = out.quantized.astype(jnp.float32)
      mask = i < kept
      quantized = quantized + q * mask[:, None, None]
      residual = residual - q
      codes.append(out.codes)
      commits.append(jnp.mean(out.commit_loss * mask))
      books.append(jnp.mean(out.codebook_loss * mask))
      masks.append(mask)
      z_es.append(out.z_e)
    return RVQOutput(quantized=quantized, codes=jnp.stack(codes, axis=-1),
                     commit_loss=jnp.stack(commits), codebook_loss=jnp.stack(books),
                     layer_mask=jnp.stack(masks, axis=-1), z_e=jnp.stack(z_es))

  def data_codebooks(self, z: jax.Array, valid: jax.Array | None, rng: jax.Array,
                     noise: float = 0.01) -> jax.Array:
    """Codebooks drawn from data, layer by layer: `[n_q, K, d]` (not assigned; the caller puts them).

    Layer i's rows are `sample_codebook` draws from its projected latents z_e,
    where layer i's residual is what the layers before it, already holding
    their drawn codebooks, leave (all N layers, no dropout).

    Args:
      z: `[batch, time, D]` latents (the encoder's output on a data batch).
      valid: optional `[batch, time]` bool; only valid frames are drawn.
      rng: PRNG key.
      noise: relative noise added to each drawn row (tells repeated draws apart).
    """
    residual = z.astype(jnp.float32)
    books = []
    for layer, key in zip(self.layers, jax.random.split(rng, self.num_quantizers)):
      z_e = layer.project(residual)
      book = sample_codebook(z_e, valid, self.codebook_size, key, noise)
      rows = jnp.take(book, nearest_code(z_e, book, self.use_l2_normalize), axis=0)
      residual = residual - layer.embed_rows(rows).astype(jnp.float32)
      books.append(book)
    return jnp.stack(books)

  def vq2emb(self, codes: jax.Array) -> jax.Array:
    """`[batch, time, n]` codes (n <= N, the first n layers) -> `[batch, time, D]` summed embeddings."""
    n = codes.shape[-1]
    if not 1 <= n <= self.num_quantizers:
      raise ValueError(f"{n} code layers given, the quantizer has {self.num_quantizers}")
    out = 0.0
    for i in range(n):
      out = out + self.layers[i].embed_codes(codes[..., i]).astype(jnp.float32)
    return out


def codebook_usage(codes: jax.Array, codebook_size: int, valid: jax.Array | None = None) -> jax.Array:
  """Code counts: `[..., n_q]` codes -> `[n_q, K]` (a `[...]` valid mask weights them)."""
  flat = codes.reshape(-1, codes.shape[-1])
  w = jnp.ones(flat.shape[:1], jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
  onehot = jax.nn.one_hot(flat.T, codebook_size, dtype=jnp.float32)  # [n_q, M, K]
  return jnp.einsum("qmk,m->qk", onehot, w)


def perplexity(counts: jax.Array) -> jax.Array:
  """exp(entropy) of code counts `[..., K]` -> `[...]` (effective codes in use)."""
  p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10), axis=-1))


def sample_codebook(z_e: jax.Array, valid: jax.Array | None, size: int, rng: jax.Array,
                    noise: float = 0.01) -> jax.Array:
  """`size` rows drawn (with replacement) from the valid frames of `[batch, time, d]` z_e.

  Each row gets Gaussian noise of `noise` times its own RMS, so rows drawn
  twice are different codes. Returns `[size, d]` float32. Pure; jit-able.
  """
  flat = z_e.reshape(-1, z_e.shape[-1]).astype(jnp.float32)
  k_pick, k_noise = jax.random.split(rng)
  if valid is None:
    picks = jax.random.randint(k_pick, (size,), 0, flat.shape[0])
  else:
    w = valid.reshape(-1).astype(jnp.float32)
    p = jnp.where(jnp.sum(w) > 0, w / jnp.maximum(jnp.sum(w), 1.0), 1.0 / w.shape[0])
    picks = jax.random.choice(k_pick, flat.shape[0], (size,), p=p)
  rows = flat[picks]
  rms = jnp.sqrt(jnp.mean(jnp.square(rows), axis=-1, keepdims=True))
  return rows + noise * rms * jax.random.normal(k_noise, rows.shape, jnp.float32)


def restart_dead_codes(codebook: jax.Array, counts: jax.Array, candidates: jax.Array, rng: jax.Array,
                       threshold: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Re-initializes rarely used codes from random encoder outputs.

  Args:
    codebook: `[K, d]` one layer's codebook.
    counts: `[K]` usage since the last restart.
    candidates: `[M, d]` projected latents z_e of recent batches.
    rng: picks the candidates.
    threshold: codes used fewer times than this are dead.

  Returns:
    (new codebook, number of codes replaced). Pure; jit-able.
  """
  dead = counts < threshold
  picks = jax.random.randint(rng, (codebook.shape[0],), 0, candidates.shape[0])
  fresh = candidates[picks].astype(codebook.dtype)
  return jnp.where(dead[:, None], fresh, codebook), jnp.sum(dead)
