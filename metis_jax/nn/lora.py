"""Low-rank adaptation (LoRA) of the backbone's linear maps, and its merge.

A LoRA on a linear map with kernel W `[*in, *out]` adds two factors, A
`[*in, r]` and B `[r, *out]`, and computes y = x W + (alpha / r) (drop(x) A) B.
B starts at zero, so a new LoRA is an exact no-op; dropout acts on the LoRA
input only, and only while training (when a `dropout` RNG is given to
`apply`). `merge_lora` folds the factors into W (W + (alpha / r) A B) and
removes them, so a merged model decodes at exactly the base model's cost.

The factors live next to the kernel they adapt (`.../query/{kernel, lora_a,
lora_b}`), named by the same logical axes as the kernel plus `lora_rank`, so
they shard like their base weight.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding

# The adaptable linear maps, by the names of the released (peft) files.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_A, LORA_B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which linear maps get a LoRA, and its size.

  Attributes:
    rank: r; 0 disables LoRA everywhere.
    alpha: the update is scaled by alpha / r (released: alpha = 2 r).
    dropout: dropout rate on the LoRA input while training.
    targets: subset of `TARGETS`.
  """
  rank: int = 0
  alpha: float = 0.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    unknown = sorted(set(self.targets) - set(TARGETS))
    if unknown:
      raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(TARGETS)}")
    if self.rank < 0:
      raise ValueError(f"LoRA rank must be >= 0, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def rank_for(self, target: str) -> int:
    """r for the linear map `target` (one of `TARGETS`), 0 when it has no LoRA."""
    return self.rank if target in self.targets else 0


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """'q_proj,v_proj' or a sequence of names -> tuple of names."""
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  return tuple(targets)


def lora_update(module: nn.Module, x: jax.Array, in_axes: tuple[str, ...],
                features: tuple[int, ...], out_axes: tuple[str, ...], rank: int, scale: float,
                dropout: float, dtype, param_dtype) -> jax.Array:
  """Creates `lora_a`, `lora_b` in `module` and returns scale * (drop(x) A) B.

  Must be called from inside `module`'s compact `__call__`.

  Args:
    x: `[..., *in]` input of the adapted map (len(in_axes) trailing axes).
    in_axes, out_axes: logical names of the kernel's input and output axes.
    features: output shape `out`.
    rank: r > 0.
    scale: alpha / r.
    dropout: rate, applied only when the module has a `dropout` RNG.

  Returns:
    `[..., *features]` in `dtype`.
  """
  contract = len(in_axes)
  in_shape = x.shape[x.ndim - contract:]
  # peft's A init (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                            in_axis=tuple(range(contract)), out_axis=-1)
  a = module.param(LORA_A, sharding.partitioned(a_init, in_axes + (RANK_AXIS,)),
                   in_shape + (rank,), param_dtype)
  b = module.param(LORA_B, sharding.partitioned(nn.initializers.zeros, (RANK_AXIS,) + out_axes),
                   (rank,) + tuple(features), param_dtype)
  if dropout and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
  x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=dtype)
  contracted = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
  low = jax.lax.dot_general(x, a, (contracted, ((), ())))  # [..., r]
  out = jax.lax.dot_general(low, b, (((low.ndim - 1,), (0,)), ((), ())))
  return out * jnp.asarray(scale, out.dtype)


def _delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
  """A `[*lead, *in, r]`, B `[*lead, r, *out]` -> A B `[*lead, *in, *out]`."""
  lead = a.ndim + b.ndim - 2 - kernel_ndim
  fn = lambda x, y: jnp.tensordot(x, y, axes=1)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(a, b)


def merge_lora(params: Any, config: Any) -> Any:
  """W + (alpha / r) A B for every adapted kernel, LoRA leaves removed.

  Args:
    params: a parameter tree (nested dicts; layers stacked or not).
    config: `LoraConfig`, or anything with a `lora` `LoraConfig` attribute
      (`MetisConfig`, `BackboneConfig`): gives alpha / r.

  Returns:
    The same tree without `lora_a`/`lora_b`; kernels in their own dtype
    (the product is formed in float32).
  """
  lora = config if isinstance(config, LoraConfig) else config.lora
  scale = lora.scale

  def merge(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: merge(v) for k, v in tree.items() if k not in (LORA_A, LORA_B)}
    if LORA_A in tree or LORA_B in tree:
      if not (LORA_A in tree and LORA_B in tree and "kernel" in tree):
        raise ValueError(f"a LoRA needs kernel, {LORA_A} and {LORA_B}; found {sorted(tree)}")
      kernel = tree["kernel"]
      if tree[LORA_A].shape[-1] != lora.rank:
        raise ValueError(f"LoRA factor of rank {tree[LORA_A].shape[-1]}, config rank {lora.rank}")
      delta = _delta(jnp.asarray(tree[LORA_A], jnp.float32), jnp.asarray(tree[LORA_B], jnp.float32),
                     kernel.ndim)
      out["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return out

  return merge(_to_dict(params))


def has_lora(params: Any) -> bool:
  """Whether any `lora_a`/`lora_b` leaf is in the tree."""
  return any(str(getattr(p, "key", p)) in (LORA_A, LORA_B)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] for p in path)


def _to_dict(tree):
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree
