"""Left-packing of padded rows: valid slots moved to the front, order kept.

Rows such as `[phones | pad | prompt | target | pad]` have padding between
their segments, so attention needs a full `[batch, 1, T, T]` mask. With RoPE
positions numbered over valid slots only (`compact_positions`), attention
depends on the set of valid slots and their positions, not on where they sit
in the row: moving the valid slots to the front (a per-row permutation) gives
the same outputs, and the padding becomes a suffix that a per-row key length
describes, which the fused kernels (cuDNN flash, Pallas splash) take.

The permutation and its inverse are both gathers; `permute` makes the
backward pass a gather by the inverse permutation too (a plain gather's
gradient is a scatter-add).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Packing(NamedTuple):
  """A per-row permutation that left-packs the valid slots.

  Attributes:
    order: `[batch, length]` int32; packed slot i holds original slot order[b, i].
    inverse: `[batch, length]` int32; original slot j sits at packed slot inverse[b, j].
    lengths: `[batch]` int32 number of valid slots (the packed valid prefix).
  """
  order: jax.Array
  inverse: jax.Array
  lengths: jax.Array


def left_pack(valid: jax.Array) -> Packing:
  """The packing of `valid` `[batch, length]` bool (stable: valid slots keep their order)."""
  valid = valid.astype(bool)
  order = jnp.argsort(~valid, axis=-1, stable=True).astype(jnp.int32)
  inverse = jnp.argsort(order, axis=-1).astype(jnp.int32)
  return Packing(order, inverse, valid.sum(-1).astype(jnp.int32))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  index = index.reshape(index.shape + (1,) * (x.ndim - index.ndim))
  return jnp.take_along_axis(x, index, axis=1)


@jax.custom_vjp
def permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """`y[b, i] = x[b, order[b, i]]` for x `[batch, length, ...]`; `inverse` = argsort(order)."""
  return _gather(x, order)


def _permute_fwd(x, order, inverse):
  return _gather(x, order), (order, inverse)


def _permute_bwd(residual, dy):
  order, inverse = residual
  return _gather(dy, inverse), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def pack(x: jax.Array, packing: Packing) -> jax.Array:
  """`[batch, length, ...]` in original slot order -> packed order."""
  return permute(x, packing.order, packing.inverse)


def unpack(x: jax.Array, packing: Packing) -> jax.Array:
  """`[batch, length, ...]` in packed order -> original slot order."""
  return permute(x, packing.inverse, packing.order)
