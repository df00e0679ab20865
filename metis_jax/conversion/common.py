"""Helpers shared by the converters: safetensors I/O, strict key checks, layer stacking."""

import json
from typing import Callable, Mapping

import numpy as np
import safetensors.numpy

from metis_jax.cli_support import UserError


class ConversionError(UserError, ValueError):
  """A weight file does not match the model it is converted into (the commands print it as `error: ...`)."""


def parse_config_metadata(metadata: Mapping[str, str], source: str) -> dict:
  """The JSON object in a file's `config` metadata entry ({} when absent).

  Raises:
    ConversionError: the entry is not JSON, or not a JSON object.
  """
  if "config" not in metadata:
    return {}
  try:
    meta = json.loads(metadata["config"])
  except ValueError as e:
    raise ConversionError(f"{source}: its 'config' metadata is not JSON ({e}); remove or fix it, "
                          "or give the model's settings as flags (e.g. --num_heads)") from None
  if not isinstance(meta, dict):
    raise ConversionError(f"{source}: its 'config' metadata is a JSON {type(meta).__name__}, not an "
                          "object of settings; remove or fix it")
  return meta


def read_model_config(path: str) -> dict:
  """A `model_config.json` as a dict; a damaged or hand-edited file is a ConversionError naming it."""
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{path} is not valid JSON ({e}); restore the file written by the conversion") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not a model config object; "
                          "restore the file written by the conversion")
  return config


def check_weights(source: str, tensors: Mapping[str, np.ndarray], keys) -> None:
  """Raises ConversionError if any of `keys` is not floating point or holds NaN/Inf."""
  not_float = sorted(k for k in keys if not np.issubdtype(np.asarray(tensors[k]).dtype, np.floating))
  if not_float:
    raise ConversionError(
        f"{source}: {len(not_float)} weights are not floating point (e.g. {not_float[0]}: "
        f"{np.asarray(tensors[not_float[0]]).dtype}); this is not a trained weight file")
  nonfinite = sorted(k for k in keys if not np.isfinite(np.asarray(tensors[k], np.float32)).all())
  if nonfinite:
    raise ConversionError(
        f"{source}: {len(nonfinite)} weights hold NaN or Inf (e.g. {nonfinite[0]}); the file is damaged or "
        "comes from a diverged run: use another checkpoint")


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
  check_weights(source, tensors, sorted(set(expected) & present))


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
