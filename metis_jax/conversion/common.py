"""Helpers shared by the converters: safetensors I/O, strict key checks, layer stacking."""

import json
from typing import Callable, Mapping

import numpy as np
import safetensors.numpy


class ConversionError(ValueError):
  """A weight file does not match the model it is converted into."""


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Returns (tensors by key, the file's string metadata)."""
  try:
    tensors = safetensors.numpy.load_file(path)
    with open(path, "rb") as f:
      header_len = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(header_len))
  except (OSError, ValueError, safetensors.SafetensorError) as e:
    raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
  return tensors, header.get("__metadata__") or {}


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
                              metadata=dict(metadata or {}))


def check_keys(source: str, tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
               ignored: Callable[[str], bool] = lambda key: False) -> None:
  """Raises ConversionError listing missing, unexpected and mis-shaped keys."""
  present = {k for k in tensors if not ignored(k)}
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  misshaped = sorted(
      f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k])}"
      for k in set(expected) & present if tuple(tensors[k].shape) != tuple(expected[k]))
  if missing or unexpected or misshaped:
    lines = [f"{source} does not match the model config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    raise ConversionError("\n".join(lines))


def stack_layers(tree: dict, num_layers: int, prefix: str = "layers_") -> dict:
  """{'layers_0': t0, ...} -> {'layers': stacked} (the nn.scan layout)."""
  out = {k: v for k, v in tree.items() if not k.startswith(prefix)}
  per_layer = [tree[f"{prefix}{i}"] for i in range(num_layers)]
  out["layers"] = _tree_map(lambda *xs: np.stack(xs), *per_layer)
  return out


def unstack_layers(tree: dict, prefix: str = "layers_") -> dict:
  """{'layers': stacked} -> {'layers_0': t0, ...}."""
  out = {k: v for k, v in tree.items() if k != "layers"}
  stacked = tree["layers"]
  n = _first_leaf(stacked).shape[0]
  for i in range(n):
    out[f"{prefix}{i}"] = _tree_map(lambda x, i=i: x[i], stacked)
  return out


def _tree_map(fn, *trees):
  if isinstance(trees[0], Mapping):
    return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def _first_leaf(tree):
  while isinstance(tree, Mapping):
    tree = next(iter(tree.values()))
  return tree


def get_path(tree: Mapping, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def set_path(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value
