"""The frozen base of a fine-tune: where it comes from, its parameters and their content hash.

`finetune.base` names one of:
  * a metis_jax training workdir (`config.json` + `checkpoints/<step>/state`):
    the newest step's parameters (e.g. the tiny base of the default job);
  * a folder written by `python -m metis_jax.convert` (`model_config.json` +
    Orbax `params/`);
  * a released Amphion stage-1 `.safetensors` file (Metis base, MaskGCT T2S;
    `conversion.t2s`), or a full fine-tuned checkpoint with `cond_adapter.*`
    keys (`conversion.finetune.load_full`).

The content hash is the sha256 of the parameters themselves (every leaf's
'/'-joined path, dtype, shape and bytes, in sorted path order, in the layout
the fine-tune uses), so it does not depend on the file format. A fine-tune
checkpoint carries it (`FinetuneState.base_hash`) and a resumed run refuses a
base whose hash differs (the frozen half of the model would silently change).
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from metis_jax import cli_support
from metis_jax.conversion import common
from metis_jax.training import trainable as trainable_lib

# Architecture fields a base must share with the fine-tune's `config.model`.
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio")
RECORD_NAME = "finetune_base.json"


class FinetuneError(cli_support.UserError, ValueError):
  """A fine-tune that cannot run as configured; the message names the key or file."""


@dataclasses.dataclass(frozen=True)
class Base:
  """A loaded base.

  Attributes:
    path: absolute path of `finetune.base`.
    description: what was read (e.g. 'workdir checkpoint step 300').
    model: the base's model config (`config.model` layout).
    params: numpy parameters in the fine-tune's layer layout (scan or not).
    sha256: hex digest of `params` (`params_sha256`).
  """
  path: str
  description: str
  model: ml_collections.ConfigDict
  params: dict
  sha256: str


def params_sha256(params: Any) -> str:
  """sha256 over (path, dtype, shape, bytes) of every leaf, in sorted path order."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  digest = hashlib.sha256()
  for name, leaf in sorted((trainable_lib.path_name(p), np.asarray(x)) for p, x in leaves):
    digest.update(f"{name}|{leaf.dtype.str}|{leaf.shape}|".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def hash_words(hexdigest: str) -> np.ndarray:
  """A sha256 hex digest -> uint32 `[8]` (how a checkpoint stores it)."""
  return np.frombuffer(bytes.fromhex(hexdigest), dtype=">u4").astype(np.uint32)


def words_hex(words) -> str:
  """Inverse of `hash_words`."""
  return np.asarray(words, np.uint32).astype(">u4").tobytes().hex()


def _newest_state(workdir: str) -> tuple[str, int] | None:
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return None
  steps = [int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
  return (os.path.join(root, str(max(steps)), "state"), max(steps)) if steps else None


def _read(path: str) -> tuple[ml_collections.ConfigDict, dict, str]:
  """-> (model config, numpy params in whatever layer layout they were saved, description)."""
  if not os.path.exists(path):
    raise FinetuneError(f"finetune.base {path}: no such file or folder; give a training workdir, a "
                        "converted folder or a released .safetensors file")
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise FinetuneError(f"finetune.base {path}: expected a .safetensors file or a model folder")
    from metis_jax.conversion import finetune, t2s  # pylint: disable=import-outside-toplevel
    if finetune.has_adapter_keys(path):
      model, params = finetune.load_full(path)
      return model, params, "full fine-tuned checkpoint"
    model, params = t2s.load_amphion(path)
    return model, params, "released stage-1 file"
  if os.path.exists(os.path.join(path, "model_config.json")):
    from metis_jax.conversion import cli as convert  # pylint: disable=import-outside-toplevel
    model, params = convert.load_converted(path)
    return model, params, "converted folder"
  newest = _newest_state(path)
  if newest is None or not os.path.exists(os.path.join(path, "config.json")):
    raise FinetuneError(f"finetune.base {path}: not a model folder (no model_config.json, nor config.json + "
                        "checkpoints/<step>/state of a training run)")
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with open(os.path.join(path, "config.json")) as f:
    model = ml_collections.ConfigDict(json.load(f)["model"])
  restored = ocp.StandardCheckpointer().restore(newest[0])
  if not isinstance(restored, dict) or "params" not in restored:
    raise FinetuneError(f"finetune.base {newest[0]}: no 'params' in the checkpoint")
  return model, jax.tree_util.tree_map(np.asarray, restored["params"]), f"workdir checkpoint step {newest[1]}"


def _layout(params: dict, scan_layers: bool, num_layers: int) -> dict:
  """`params` with the backbone in the scan (stacked) or the per-layer layout."""
  backbone = params.get("backbone", {})
  stacked = "layers" in backbone
  if scan_layers and not stacked:
    return dict(params, backbone=common.stack_layers(backbone, num_layers))
  if not scan_layers and stacked:
    return dict(params, backbone=common.unstack_layers(backbone))
  return params


def check_architecture(base_model: ml_collections.ConfigDict, model: ml_collections.ConfigDict, path: str) -> None:
  """Refuses a base whose sizes differ from `config.model` (naming the first key that differs)."""
  for key in ARCHITECTURE:
    if key in base_model and base_model[key] != model[key]:
      raise FinetuneError(f"finetune.base {path} has model.{key} = {base_model[key]} but the config has "
                          f"model.{key} = {model[key]}; set --config.model.{key}={base_model[key]} or use "
                          "a base of the configured size")


def load_base(path: str, model: ml_collections.ConfigDict) -> Base:
  """Reads `finetune.base` for a fine-tune of model config `model` (sizes checked, layout matched)."""
  path = os.path.abspath(os.path.expanduser(path))
  base_model, params, description = _read(path)
  if base_model.get("kind", "metis") != "metis":
    raise FinetuneError(f"finetune.base {path}: a {base_model.kind!r} model, not a stage-1 Metis model")
  check_architecture(base_model, model, path)
  params = _layout(params, bool(model.scan_layers), int(model.num_layers))
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype,
                                                                                       np.floating)
                                  else np.asarray(x), params)
  return Base(path, description, base_model, params, params_sha256(params))


def read_record(workdir: str) -> dict | None:
  """`<workdir>/finetune_base.json` ({'path', 'sha256', 'description'}), if present."""
  path = os.path.join(workdir, RECORD_NAME)
  if "://" in workdir or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_record(workdir: str, base: Base) -> None:
  if jax.process_index() != 0 or "://" in workdir:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, RECORD_NAME), "w") as f:
    json.dump({"path": base.path, "sha256": base.sha256, "description": base.description}, f, indent=1)


def check_same_base(saved_hex: str, saved_path: str, base: Base, where: str) -> None:
  """Refuses to resume a fine-tune whose base changed since its checkpoints were written."""
  if saved_hex != base.sha256:
    raise FinetuneError(
        f"finetune.base {base.path} ({base.description}) has content hash {base.sha256[:16]}..., but {where} "
        f"was fine-tuned from {saved_path or 'another base'} with hash {saved_hex[:16]}...; resume with the "
        "same base, or start the fine-tune in a new --workdir")
