"""Loading experiment configs: a Python file with `get_config()`, plus overrides.

The command-line entry points use absl's `config_flags` (`--config path.py`
and `--config.a.b=value`); this module gives the same to Python code and
tests, with the same strictness: overriding an undeclared key is an error.
"""

import ast
import dataclasses
import importlib.util
import os
from typing import Optional, Sequence

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


def split_variant(name_or_path: str) -> tuple[str, Optional[str]]:
  """`configs/s2a.py:tiny` -> (`configs/s2a.py`, 'tiny'); no `:variant` -> (name_or_path, None)."""
  if ":" in name_or_path and not os.path.exists(name_or_path):
    path, _, arg = name_or_path.rpartition(":")
    return path, arg
  return name_or_path, None


def config_path(name_or_path: str) -> str:
  """`tiny` -> `<repo>/configs/tiny.py`; an existing path is returned as is (a `:variant` is dropped)."""
  name_or_path, _ = split_variant(name_or_path)
  if os.path.exists(name_or_path):
    return name_or_path
  candidate = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".py") else name_or_path + ".py")
  if not os.path.exists(candidate):
    raise FileNotFoundError(f"no config file {name_or_path!r} (looked for {candidate})")
  return candidate


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a config file and applies `key.path=value` overrides.

  `file.py:variant` (as on the command line, big_vision style) calls
  `get_config('variant')`.
  """
  path = config_path(name_or_path)
  _, arg = split_variant(name_or_path)
  spec = importlib.util.spec_from_file_location(f"metis_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if arg is None else module.get_config(arg)
  for override in overrides:
    apply_override(config, override)
  return config


def load_sibling(config_file: str, sibling: str, variant: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config of `sibling` (a file beside `config_file`, e.g. `__file__`), with its `variant`.

  How the one-line config files of the old names return a variant of a shared file:
  `return config_lib.load_sibling(__file__, "s2a.py", "tiny")`.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), sibling)
  return load_config(path if variant is None else f"{path}:{variant}")


def unknown_variant(file: str, variant: str, known) -> ValueError:
  """The error for a `:variant` a config file does not define."""
  return ValueError(f"{os.path.basename(file)} has no variant {variant!r}; use one of {', '.join(known)}")


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Sets one `a.b.c=value` on `config`; the key must already exist."""
  key, sep, raw = override.partition("=")
  if not sep:
    raise ValueError(f"override {override!r} is not of the form key=value")
  key = key.strip().removeprefix("--").removeprefix("config.")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise KeyError(f"unknown config key {key!r} (no {part!r})")
    node = node[part]
  if leaf not in node:
    raise KeyError(f"unknown config key {key!r}")
  current = node[leaf]
  node[leaf] = _parse_like(raw, current, key)


def _parse_like(raw: str, current, key: str):
  if isinstance(current, str):
    return raw
  if isinstance(current, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"config key {key!r} wants a bool, got {raw!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"config key {key!r}: cannot parse {raw!r}") from e
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if current is not None and not isinstance(value, type(current)) and not (
      isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
    raise ValueError(f"config key {key!r} is {type(current).__name__}, got {raw!r}")
  return type(current)(value) if isinstance(current, (tuple, list)) else value


def dataclass_from_config(cls, config: ml_collections.ConfigDict):
  """Builds the (frozen) dataclass `cls` from the matching fields of `config`."""
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in config.items() if k in fields})


def config_from_dataclass(instance) -> ml_collections.ConfigDict:
  """A ConfigDict holding every field of a dataclass instance (its defaults, documented there)."""
  return ml_collections.ConfigDict(dataclasses.asdict(instance))
