"""Bidirectional multi-head self-attention with RoPE and a key-padding mask.

The kernel is chosen per backend (`choose_implementation`): XLA (the
reference), cuDNN flash on a GPU in bf16/f16, Pallas splash on a TPU. The
fused ones take the key padding as per-row lengths of left-packed rows.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.parallel import sharding
from metis_jax.nn import lora as lora_lib
from metis_jax.nn import matmul
from metis_jax.nn import rope

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def attention_mask(valid: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """Boolean `[batch, 1, q_length, k_length]` (or `[batch, 1, 1, k_length]`) mask.

  Args:
    valid: `[batch, length]`, True where a key is a real token.
    segment_ids: optional `[batch, length]` ids of packed sequences; queries
      then only see keys of their own segment.
  """
  if segment_ids is None:
    return valid[:, None, None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & valid[:, None, :])[:, None, :, :]


class Projection(nn.Module):
  """`y = einsum(x, kernel)` with a kernel created at its full rank.

  Same parameter (`kernel`, no bias) as `nn.DenseGeneral`, but DenseGeneral
  draws a flat 2-D kernel and reshapes it; with logically partitioned
  initializers its unbox applies the 3 logical names to the 2-D value, which
  fails whenever a mesh and axis rules are active (flax also re-runs the
  initializer under eval_shape in `apply` to check shapes, so even the
  training forward pass failed under a mesh).

  Attributes:
    features: output feature shape, e.g. (heads, head_dim) or (embed,).
    contract: number of trailing input axes to contract (1 for q/k/v, 2 for
      the output projection over (heads, head_dim)).
    logical_axes: logical names of the kernel, input axes then output axes.
    lora_rank: rank of a LoRA on this map (0: none, and no LoRA parameters).
    lora_scale: alpha / r of that LoRA.
    lora_dropout: dropout on the LoRA input (only with a `dropout` RNG).
  """
  features: tuple[int, ...]
  contract: int
  logical_axes: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0
  lora_scale: float = 0.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., *contracted]` -> `[..., *features]`."""
    in_shape = x.shape[x.ndim - self.contract:]
    kernel = self.param("kernel", sharding.partitioned(KERNEL_INIT, self.logical_axes),
                        in_shape + tuple(self.features), self.param_dtype)
    lora_in = x
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = matmul.contract_trailing(x, kernel, self.contract, current_backend())
    if self.lora_rank:
      y = y + lora_lib.lora_update(
          self, lora_in, tuple(self.logical_axes[:self.contract]), tuple(self.features),
          tuple(self.logical_axes[self.contract:]), self.lora_rank, self.lora_scale,
          self.lora_dropout, self.dtype, self.param_dtype)
    return y


IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# Kernels that take the key padding as per-row lengths (a valid prefix), not
# as a mask: models left-pack their rows for them (`nn.packing`).
LENGTH_MASK_KERNELS = ("cudnn", "splash")


def current_backend() -> str:
  """The platform being traced for: the active mesh's devices, else the default backend.

  Ahead-of-time compiles for a TPU topology trace on a host whose default
  backend is the CPU; their mesh names the target's platform.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None)
  return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform) or jax.default_backend()


def choose_implementation(requested: Optional[str], dtype,
                          backend: Optional[str] = None) -> Optional[str]:
  """The attention kernel to use: 'xla', 'cudnn', 'splash' or None (JAX chooses).

  An explicit request wins. Otherwise a GPU in bfloat16/float16 takes the
  fused cuDNN kernel: JAX's own choice is the unfused XLA one, which
  materializes the [batch, heads, T, T] scores (metis_base train step on an
  H100, 16 x 1024 tokens: 27% MFU with XLA, 40% with cuDNN;
  benchmarks/train.py). A TPU takes the Pallas splash kernel (JAX has no
  fused attention of its own there). Elsewhere (CPU, float32 on a GPU) JAX
  chooses, which is XLA.

  Args:
    requested: the configured kernel ('' or None: choose).
    dtype: the compute dtype of q/k/v.
    backend: 'cpu', 'gpu' or 'tpu' (default `current_backend()`).
  """
  if requested:
    if requested not in IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {requested!r} is not one of {IMPLEMENTATIONS}")
    return requested
  backend = backend or current_backend()
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "tpu":
    return "splash"
  return None


def takes_lengths(implementation: Optional[str]) -> bool:
  """Whether `implementation` wants left-packed rows with per-row key lengths."""
  return implementation in LENGTH_MASK_KERNELS


def _large_negative() -> float:
  """The masked-score fill of `jax.nn.dot_product_attention` (finite: empty rows stay uniform)."""
  return -0.7 * float(jnp.finfo(jnp.float32).max)


def _dot_precision(dtype):
  """Like JAX's XLA attention: bf16/f16 operands with float32 accumulation, else default."""
  return {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
          jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(dtype))


def _scores(q: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """`[batch, heads, q, k]` float32 scaled scores of head-major `[batch, heads, length,
  head_dim]` q and k, masked keys set to JAX's fill."""
  scores = jnp.einsum("bnth,bnsh->bnts", q, k, precision=_dot_precision(q.dtype),
                      preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(1.0 / np.sqrt(q.shape[-1]))
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.float32(_large_negative()))
  return scores


def _attend(q, k, v, mask):
  """Softmax attention normalized after the value product, of head-major q, k, v.

  Args:
    q, k, v: `[batch, heads, length, head_dim]`.
    mask: broadcastable to `[batch, heads, q, k]`, or None.

  Returns:
    `[batch, heads, q, head_dim]` float32 outputs, and the row max and row sum
    of the exponentials, each `[batch, heads, q, 1]`.
  """
  scores = _scores(q, k, mask)
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - peak)                      # [batch, heads, q, k], unnormalized
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bnts,bnsh->bnth", weights.astype(v.dtype), v,
                   precision=_dot_precision(v.dtype), preferred_element_type=jnp.float32)
  return out / total, peak, total


def _heads_first(x: jax.Array) -> jax.Array:
  """`[batch, length, heads, head_dim]` <-> `[batch, heads, length, head_dim]`."""
  return jnp.swapaxes(x, 1, 2)


def _query_blocks(x: jax.Array, blocks: int, axis: int) -> jax.Array:
  """Splits `axis` (zero-padded to a multiple of `blocks`) into a leading blocks axis."""
  size = -(-x.shape[axis] // blocks)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size * blocks - x.shape[axis])
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:axis] + (blocks, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _merge_blocks(x: jax.Array, axis: int, length: int) -> jax.Array:
  """Inverse of `_query_blocks`: `[blocks, ...]` back to `length` along `axis`."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q, k, v, mask, blocks):
  """`[batch, length, heads, head_dim]` attention over `blocks` query blocks; mask 4-D."""
  out, _ = _blocked_forward(q, k, v, mask, blocks)
  return out


def _blocked_forward(q, k, v, mask, blocks):
  """`_attend` one block of query rows at a time, so each block's scores stay in cache.

  q, k and v go head-major (`[batch, heads, length, head_dim]`) once, ahead of the
  blocks: the block products are then plain batched matmuls, with no per-block
  transpose of the keys and values.
  """
  length = q.shape[1]
  q_blocks = _query_blocks(_heads_first(q), blocks, 2)
  k, v = _heads_first(k), _heads_first(v)
  per_query_mask = mask.shape[2] != 1
  mask_blocks = _query_blocks(mask, blocks, 2) if per_query_mask else None

  def block(_, xs):
    q_b, mask_b = xs
    return None, _attend(q_b, k, v, mask_b if per_query_mask else mask)

  _, (out, peak, total) = jax.lax.scan(block, None, (q_blocks, mask_blocks))
  merged = jnp.swapaxes(_merge_blocks(out, 2, length), 1, 2)
  return merged.astype(q.dtype), (out, peak, total)


def _blocked_fwd(q, k, v, mask, blocks):
  out, (out_blocks, peak, total) = _blocked_forward(q, k, v, mask, blocks)
  return out, (q, k, v, mask, out_blocks, peak, total)


def _blocked_bwd(blocks, residuals, d_out):
  """Softmax attention's gradient, recomputing each query block's probabilities (head-major)."""
  q, k, v, mask, out_blocks, peak, total = residuals
  length = q.shape[1]
  scale = jnp.float32(1.0 / np.sqrt(q.shape[-1]))
  per_query_mask = mask.shape[2] != 1
  mask_blocks = _query_blocks(mask, blocks, 2) if per_query_mask else None
  d_out_blocks = _query_blocks(_heads_first(d_out.astype(jnp.float32)), blocks, 2)
  q_blocks = _query_blocks(_heads_first(q), blocks, 2)
  k_hm, v_hm = _heads_first(k), _heads_first(v)
  precision = _dot_precision(q.dtype)
  dot = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)

  def block(carry, xs):
    dk, dv = carry
    q_b, mask_b, out_b, peak_b, total_b, d_out_b = xs
    mask_b = mask_b if per_query_mask else mask
    probs = jnp.exp(_scores(q_b, k_hm, mask_b) - peak_b) / total_b   # [batch, heads, bq, k]
    d_out_c = d_out_b.astype(v.dtype)
    dv = dv + dot("bnts,bnth->bnsh", probs.astype(v.dtype), d_out_c)
    d_probs = dot("bnth,bnsh->bnts", d_out_c, v_hm)
    delta = jnp.sum(d_out_b * out_b, axis=-1, keepdims=True)
    d_scores = jnp.where(mask_b, probs * (d_probs - delta), 0.0) * scale
    d_scores = d_scores.astype(q.dtype)
    dq_b = dot("bnts,bnsh->bnth", d_scores, k_hm)
    dk = dk + dot("bnts,bnth->bnsh", d_scores, q_b)
    return (dk, dv), dq_b

  zeros = jnp.zeros(k_hm.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(
      block, (zeros, zeros), (q_blocks, mask_blocks, out_blocks, peak, total, d_out_blocks))
  dq = _heads_first(_merge_blocks(dq, 2, length))
  return (dq.astype(q.dtype), _heads_first(dk).astype(k.dtype), _heads_first(dv).astype(v.dtype),
          None)


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)

# Query rows per block: their [batch, heads, rows, k] float32 scores are kept
# near this size (bytes), so they stay in a CPU's cache between the passes.
BLOCK_BYTES = 8 << 20


def query_blocks(batch: int, heads: int, q_length: int, k_length: int,
                 block_bytes: int = BLOCK_BYTES) -> int:
  """How many blocks `xla_attention` splits the query rows into (1: none)."""
  rows = max(8, block_bytes // (4 * batch * heads * k_length))
  return max(1, -(-q_length // rows))


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                  kv_lengths: Optional[jax.Array] = None, blocks: int = 1) -> jax.Array:
  """Unfused softmax attention, the same function as `jax.nn.dot_product_attention`'s XLA one.

  Fewer passes over the `[batch, heads, q, k]` float32 scores than JAX's: the
  mask is one select (broadcast inside the fusion, never materialized) ahead of
  the row max, and the softmax is normalized after the value product, dividing
  the `[batch, q, heads, head_dim]` output by the row sums instead of the
  scores by them. The scores, their scaling and the fill of masked keys are
  JAX's, so the outputs differ from it only by float rounding (~1e-6 relative
  in float32); a query row with no valid key is uniform over all keys, as there.

  With `blocks > 1` the query rows go through in that many blocks (a scan), and
  the gradient recomputes each block's probabilities instead of keeping the
  `[batch, heads, q, k]` ones (flash-attention style): each block's scores
  stay in cache, and training memory no longer holds the scores. The outputs
  are the same numbers as with one block.

  Args:
    q, k, v: `[batch, length, heads, head_dim]`.
    mask: boolean, broadcastable to `[batch, heads, q_length, k_length]`
      (True: attend), or None.
    kv_lengths: `[batch]` int: only keys `[0, kv_lengths[b])` are valid
      (exclusive with `mask`), or None.
    blocks: number of query blocks (see `query_blocks`).

  Returns:
    `[batch, length, heads, head_dim]` in `q.dtype`.
  """
  if kv_lengths is not None:
    mask = (jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None])[:, None, None, :]
  if blocks <= 1:
    out, _, _ = _attend(_heads_first(q), _heads_first(k), _heads_first(v), mask)
    return _heads_first(out).astype(q.dtype)
  if mask is None:
    mask = jnp.ones((1, 1, 1, k.shape[1]), bool)
  mask = jnp.asarray(mask).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
  return _blocked_attention(q, k, v, mask, blocks)


def _splash_block(length: int) -> int:
  return next(b for b in (512, 256, 128) if length % b == 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                     interpret: bool = False) -> jax.Array:
  """Pallas splash attention (TPU) over left-packed rows.

  Args:
    q, k, v: `[batch, length, heads, head_dim]`.
    kv_lengths: `[batch]` int32 valid prefix of each row.
    interpret: run the kernel in the Pallas interpreter (tests on CPU).

  Returns:
    `[batch, length, heads, head_dim]`. Rows inside the prefix attend to the
    prefix only; padding rows attend to the padding (segment ids 0 and 1),
    so no row is empty and nothing is NaN.
  """
  # Imported here: the Pallas TPU ops are only needed (and only lower) on TPU.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  batch, length, heads, head_dim = q.shape
  padded = -(-length // 128) * 128
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
  if padded != length:
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [batch, heads, length, head_dim]
  block = _splash_block(padded)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  segments = (jnp.arange(padded)[None, :] >= kv_lengths[:, None]).astype(jnp.int32)
  out = jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(q=segments, kv=segments))
  return jnp.swapaxes(out, 1, 2)[:, :length]


def _sharded_splash(q, k, v, kv_lengths, interpret: bool = False):
  """`splash_attention` per device under the active mesh (Pallas calls do not partition).

  Falls back to None when the rules split the length or head_dim axis (the
  kernel needs whole rows), so the caller uses XLA.
  """
  mesh = jax.sharding.get_abstract_mesh()
  run = functools.partial(splash_attention, interpret=interpret)
  if mesh.empty:
    return run(q, k, v, kv_lengths)
  spec = nn.logical_to_mesh_axes(sharding.BATCH_LENGTH_HEADS_KV)
  if spec[1] is not None or spec[3] is not None:
    return None
  qkv = jax.sharding.PartitionSpec(*spec)
  rows = jax.sharding.PartitionSpec(spec[0])
  return jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       check_vma=False)(q, k, v, kv_lengths)


def _xla_blocks(q: jax.Array, k: jax.Array) -> int:
  """Query blocks for `xla_attention`: on a CPU only, and only if the length is not sharded.

  On a CPU the blocks keep the scores in cache (tiny config, 8 x 650 tokens:
  the attention forward 2.5x faster than one block); elsewhere the unblocked
  path stays, and a length split over devices is not cut into blocks.
  """
  if current_backend() != "cpu":
    return 1
  if not jax.sharding.get_abstract_mesh().empty:
    if nn.logical_to_mesh_axes(sharding.BATCH_LENGTH_HEADS_KV)[1] is not None:
      return 1
  return query_blocks(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


class SelfAttention(nn.Module):
  """q/k/v/o projections without bias, RoPE on q and k, no causal mask.

  Attributes:
    num_heads: number of heads; head_dim = embed // num_heads.
    rope_theta: RoPE base.
    implementation: attention kernel (None = `choose_implementation`'s
      default, 'xla', 'cudnn', 'splash').
    lora: LoRA on q/k/v/o (`q_proj`... among its targets); default none.
  """
  num_heads: int
  rope_theta: float = 10000.0
  implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig()

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: Optional[jax.Array] = None,
               kv_lengths: Optional[jax.Array] = None) -> jax.Array:
    """Attends over all valid keys, given by `mask` or (left-packed rows) by `kv_lengths`.

    Args:
      x: `[batch, length, embed]`.
      positions: `[batch, length]` RoPE positions.
      mask: boolean, broadcastable to `[batch, heads, length, length]`.
      kv_lengths: `[batch]` int32: keys `[0, kv_lengths[b])` of row b are
        valid (rows packed by `nn.packing`); exclusive with `mask`. Query
        rows past the length still attend to the valid keys, except with
        splash (they attend to the padding; their outputs are padding).

    Returns:
      `[batch, length, embed]`.
    """
    if (mask is None) == (kv_lengths is None):
      raise ValueError("pass exactly one of `mask` and `kv_lengths`")
    embed = x.shape[-1]
    head_dim = embed // self.num_heads
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    adapted = lambda target: dict(lora_rank=self.lora.rank_for(target), lora_scale=self.lora.scale,
                                  lora_dropout=self.lora.dropout)
    projection = lambda name, target: Projection(
        (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), name=name, **dtypes,
        **adapted(target))
    q = rope.apply_rope(projection("query", "q_proj")(x), positions, self.rope_theta)
    k = rope.apply_rope(projection("key", "k_proj")(x), positions, self.rope_theta)
    v = projection("value", "v_proj")(x)
    q = sharding.constrain(q, sharding.BATCH_LENGTH_HEADS_KV)
    k = sharding.constrain(k, sharding.BATCH_LENGTH_HEADS_KV)
    v = sharding.constrain(v, sharding.BATCH_LENGTH_HEADS_KV)
    implementation = choose_implementation(self.implementation, q.dtype)
    out = None
    if kv_lengths is not None:
      # A row with no valid key would give cuDNN an empty softmax; its outputs are padding.
      kv_lengths = jnp.maximum(kv_lengths.astype(jnp.int32), 1)
      if implementation == "splash":
        out = _sharded_splash(q, k, v, kv_lengths)
        implementation = "xla" if out is None else implementation
      if out is None and implementation == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths,
                                           implementation=implementation)
      elif out is None:
        out = xla_attention(q, k, v, kv_lengths=kv_lengths, blocks=_xla_blocks(q, k))
    else:
      if implementation == "cudnn":
        # The fused kernel takes a mask only as a bias of full [batch, 1, q, k] shape (it
        # rejects a broadcast key-padding mask); left-packed rows use kv_lengths instead.
        mask = jnp.broadcast_to(mask, (mask.shape[0], 1, x.shape[1], x.shape[1]))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
      else:  # XLA; also splash's: arbitrary masks (segment ids of packed data)
        out = xla_attention(q, k, v, mask=mask, blocks=_xla_blocks(q, k))
    out = sharding.constrain(out, sharding.BATCH_LENGTH_HEADS_KV)
    out = Projection((embed,), 2, ("heads", "kv", "embed"), name="out", **dtypes,
                     **adapted("o_proj"))(out)
    return sharding.constrain(out, sharding.BATCH_LENGTH_EMBED)
