"""Which parameters a fine-tune trains: masks, the (trainable, frozen) split, a size report.

Parameters fall into groups by their path:
  lora     `.../lora_a`, `.../lora_b` (the LoRA factors)
  adapter  `adapter/...` (the frame-level condition adapter)
  phones   `phone_embed/...`, `phone_mlp/...` (the TTS phone prefix)
  base     everything else (embeddings, backbone, logits head)

A trainable set is named by groups joined with '+' (`lora+adapter`,
`lora+phones`, `adapter`, `full` = every group), by `re:<regex>` (searched in
the '/'-joined path), or by a sequence of regexes. A step differentiates only
the trainable tree:

  trainable, frozen = split(params, mask)
  def loss_fn(trainable, frozen, batch):
    params = join(trainable, frozen)
    ...
  grads = jax.grad(loss_fn)(trainable, frozen, batch)   # only trainable leaves

Both halves keep the full tree structure with `None` at the other half's
leaves (an empty subtree to JAX and optax), so optimizer state exists only
for trainable parameters.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np

GROUPS = ("base", "lora", "adapter", "phones")
_LORA_LEAVES = ("lora_a", "lora_b")
_PHONE_MODULES = ("phone_embed", "phone_mlp")


def path_name(path) -> str:
  """A key path -> 'backbone/layers/attention/query/kernel'."""
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def group_of(name: str) -> str:
  """The group of a parameter, from its '/'-joined path."""
  parts = name.split("/")
  if parts[-1] in _LORA_LEAVES:
    return "lora"
  if parts[0] == "adapter":
    return "adapter"
  if parts[0] in _PHONE_MODULES:
    return "phones"
  return "base"


def _selector(spec: str | Sequence[str]):
  """spec -> predicate on a parameter's path name."""
  if isinstance(spec, str) and spec.startswith("re:"):
    spec = [spec[3:]]
  if isinstance(spec, str):
    groups = set(GROUPS) if spec == "full" else set(spec.split("+"))
    unknown = sorted(groups - set(GROUPS))
    if unknown or not spec:
      raise ValueError(f"unknown trainable group(s) {unknown or [spec]} in {spec!r}: use groups of "
                       f"{list(GROUPS)} joined with '+', 'full', or 're:<regex>'")
    return lambda name: group_of(name) in groups
  patterns = [re.compile(p) for p in spec]
  return lambda name: any(p.search(name) for p in patterns)


def trainable_mask(params: Any, spec: str | Sequence[str]) -> Any:
  """Boolean pytree over `params` (same structure): True where trained.

  Works on arrays or `jax.ShapeDtypeStruct` leaves. Raises ValueError when
  the spec selects nothing.
  """
  select = _selector(spec)
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(select(path_name(path))), params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError(f"trainable set {spec!r} selects no parameter of this model "
                     f"(its groups: {sorted(group_counts(params))})")
  return mask


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen): the full structure each, `None` at the other's leaves."""
  trainable = jax.tree_util.tree_map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree_util.tree_map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
  """Inverse of `split`: the full parameter tree."""
  return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                is_leaf=lambda x: x is None)


def _size(x) -> int:
  return int(np.prod(x.shape)) if hasattr(x, "shape") else int(np.size(x))


def group_counts(params: Any, mask: Any = None) -> dict[str, int]:
  """Parameters per group (only the masked-in ones when `mask` is given)."""
  counts: dict[str, int] = {}
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  selected = jax.tree_util.tree_leaves(mask) if mask is not None else [True] * len(leaves)
  for (path, leaf), keep in zip(leaves, selected):
    if keep:
      group = group_of(path_name(path))
      counts[group] = counts.get(group, 0) + _size(leaf)
  return counts


def _millions(n: int) -> str:
  return f"{n / 1e6:.1f}M"


def report(params: Any, mask: Any = None) -> str:
  """A small table: parameters per group, whether trained, the totals.

  group      params  trained
  base       725.9M  no
  lora        18.1M  yes
  total      744.0M
  trainable   18.1M
  """
  total = group_counts(params)
  trained = group_counts(params, mask) if mask is not None else total
  rows = [("group", "params", "trained")]
  for group in GROUPS:
    if group in total:
      flag = "yes" if trained.get(group) == total[group] else ("part" if trained.get(group) else "no")
      rows.append((group, _millions(total[group]), flag))
  rows.append(("total", _millions(sum(total.values())), ""))
  rows.append(("trainable", _millions(sum(trained.values())), ""))
  return "\n".join(f"{a:<10} {b:>8}  {c}".rstrip() for a, b, c in rows)
