"""Released Metis fine-tunes (LoRA + adapter, full checkpoints) <-> MetisModel parameters.

Two released layouts (Amphion key names, Linear weights `[out, in]`):

* Three files, the SE / TSE / VC fine-tunes: the Metis base
  (`metis_base/model.safetensors`, the stage-1 keys of `conversion.t2s`),
  a LoRA (`metis_*_lora_{32,16}.safetensors`)
    model.diff_estimator.layers.N.self_attn.{q,k,v,o}_proj.lora_{A [r, in], B [out, r]}.default.weight
    model.diff_estimator.layers.N.mlp.{gate,up,down}_proj.lora_{A,B}.default.weight
  and a gated adapter (`metis_*_lora_*_adapter.safetensors`)
    model.cond_adapter.{in_linear.{weight [4H, c], bias}, out_linear.{weight [H, 4H], bias},
                        gate_scale [1]}
  The LoRA's merged weight is W + (alpha / r) B A.
* One full checkpoint (L2S; Omni): the stage-1 keys plus `cond_adapter.*`,
  either ungated (`cond_adapter.0` Linear(c, 4H), SiLU, `cond_adapter.2`
  Linear(4H, H)) or gated (`cond_adapter.{in_linear, out_linear, gate_scale}`).

The original loads LoRA and adapter files with strict=False, silently
ignoring keys that do not match; here any missing, unexpected or mis-shaped
key is refused with the full list.
"""

import json
import re

import jax
import ml_collections
import numpy as np
import safetensors

from metis_jax.conversion import common, t2s
from metis_jax.nn import lora as lora_lib

# The released fine-tunes train LoRA with dropout 0.01 and alpha = 2 r.
RELEASED_LORA_DROPOUT = 0.01
RELEASED_ALPHA_PER_RANK = 2.0

_LORA_KEY = re.compile(r"^model\.diff_estimator\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                       r"\.lora_([AB])\.default\.weight$")
# Released module name -> (block, our path inside a layer, kind).
_LORA_MODULES = {
    "q_proj": ("self_attn", ("attention", "query"), "qkv"),
    "k_proj": ("self_attn", ("attention", "key"), "qkv"),
    "v_proj": ("self_attn", ("attention", "value"), "qkv"),
    "o_proj": ("self_attn", ("attention", "out"), "out"),
    "gate_proj": ("mlp", ("mlp", "gate"), "linear"),
    "up_proj": ("mlp", ("mlp", "up"), "linear"),
    "down_proj": ("mlp", ("mlp", "down"), "linear"),
}
_RELEASED_ADAPTER = "model.cond_adapter."
_FULL_ADAPTER = "cond_adapter."
# Adapter layouts: our (module, param) -> released suffix after the prefix.
_GATED_ADAPTER = {("in_linear", "kernel"): "in_linear.weight",
                  ("in_linear", "bias"): "in_linear.bias",
                  ("out_linear", "kernel"): "out_linear.weight",
                  ("out_linear", "bias"): "out_linear.bias",
                  ("gate_scale",): "gate_scale"}
_UNGATED_ADAPTER = {("in_linear", "kernel"): "0.weight", ("in_linear", "bias"): "0.bias",
                    ("out_linear", "kernel"): "2.weight", ("out_linear", "bias"): "2.bias"}


# ---------------------------------------------------------------- LoRA files

def _lora_dims(model: ml_collections.ConfigDict, module: str) -> tuple[int, int]:
  """(in, out) of the base Linear a LoRA module adapts."""
  h, ff = model.hidden_size, model.mlp_ratio * model.hidden_size
  return {"gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}.get(module, (h, h))


def _lora_key(layer: int, module: str, factor: str) -> str:
  block = _LORA_MODULES[module][0]
  return f"model.diff_estimator.layers.{layer}.{block}.{module}.lora_{factor}.default.weight"


def lora_expected_shapes(model: ml_collections.ConfigDict, rank: int,
                         targets: tuple[str, ...]) -> dict[str, tuple]:
  """Released LoRA key -> shape for a base model config, rank and target modules."""
  shapes = {}
  for i in range(model.num_layers):
    for module in targets:
      d_in, d_out = _lora_dims(model, module)
      shapes[_lora_key(i, module, "A")] = (rank, d_in)
      shapes[_lora_key(i, module, "B")] = (d_out, rank)
  return shapes


def infer_lora(tensors: dict[str, np.ndarray], source: str) -> tuple[int, tuple[str, ...]]:
  """(rank, target modules in `lora.TARGETS` order) named by a LoRA file's keys."""
  found = [(m, k) for k in sorted(tensors) if (m := _LORA_KEY.match(k))]
  modules = {m.group(3) for m, _ in found if m.group(3) in _LORA_MODULES}
  if not modules:
    raise common.ConversionError(
        f"{source}: no LoRA keys (model.diff_estimator.layers.N.<block>.<q|k|v|o|gate|up|down>_proj"
        f".lora_A.default.weight); not a released Metis LoRA file")
  a_ranks = [int(tensors[k].shape[0]) for m, k in found if m.group(4) == "A" and tensors[k].ndim == 2]
  b_ranks = [int(tensors[k].shape[1]) for m, k in found if m.group(4) == "B" and tensors[k].ndim == 2]
  ranks = a_ranks or b_ranks
  # The most common rank; keys of any other rank are then reported as mis-shaped.
  rank = max(set(ranks), key=ranks.count) if ranks else 0
  return rank, tuple(t for t in lora_lib.TARGETS if t in modules)


def lora_to_params(tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict,
                   source: str = "LoRA file") -> tuple[dict, int, tuple[str, ...]]:
  """Strictly converts a released LoRA state dict for the base `model`.

  Returns:
    (the LoRA leaves as an unscanned partial tree {'backbone': {'layers_i':
    {...: {'lora_a', 'lora_b'}}}}, rank, target modules).
  """
  rank, targets = infer_lora(tensors, source)
  common.check_keys(source, tensors, lora_expected_shapes(model, rank, targets))
  dtype = np.dtype(model.param_dtype)
  tree: dict = {}
  for i in range(model.num_layers):
    for module in targets:
      _, path, kind = _LORA_MODULES[module]
      a = np.asarray(tensors[_lora_key(i, module, "A")], np.float32)
      b = np.asarray(tensors[_lora_key(i, module, "B")], np.float32)
      ours_a, ours_b = _lora_to_ours(kind, a, b, model.num_heads)
      prefix = ("backbone", f"layers_{i}") + path
      common.set_path(tree, prefix + (lora_lib.LORA_A,), ours_a.astype(dtype))
      common.set_path(tree, prefix + (lora_lib.LORA_B,), ours_b.astype(dtype))
  return tree, rank, targets


def _lora_to_ours(kind: str, a: np.ndarray, b: np.ndarray, num_heads: int):
  """Released A `[r, in]`, B `[out, r]` -> our A `[*in, r]`, B `[r, *out]`."""
  r = a.shape[0]
  if kind == "qkv":
    return a.T, b.T.reshape(r, num_heads, -1)
  if kind == "out":
    return a.T.reshape(num_heads, -1, r), b.T
  return a.T, b.T


def _lora_to_released(a: np.ndarray, b: np.ndarray):
  """Our A `[*in, r]`, B `[r, *out]` -> released A `[r, in]`, B `[out, r]`."""
  r = a.shape[-1]
  return a.reshape(-1, r).T, b.reshape(r, -1).T


# ------------------------------------------------------------- adapter files

def adapter_expected_shapes(prefix: str, layout: dict, model: ml_collections.ConfigDict,
                            cond_dim: int) -> dict[str, tuple]:
  h = model.hidden_size
  ff = model.mlp_ratio * h
  shapes = {("in_linear", "kernel"): (ff, cond_dim), ("in_linear", "bias"): (ff,),
            ("out_linear", "kernel"): (h, ff), ("out_linear", "bias"): (h,), ("gate_scale",): (1,)}
  return {prefix + suffix: shapes[path] for path, suffix in layout.items()}


def adapter_to_params(tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict,
                      prefix: str, gated: bool, source: str = "adapter file") -> tuple[dict, int]:
  """Strictly converts adapter weights (keys under `prefix`) -> ({'adapter': ...}, c)."""
  layout = _GATED_ADAPTER if gated else _UNGATED_ADAPTER
  in_key = prefix + layout[("in_linear", "kernel")]
  cond_dim = int(tensors[in_key].shape[-1]) if in_key in tensors and tensors[in_key].ndim == 2 else 0
  common.check_keys(source, tensors, adapter_expected_shapes(prefix, layout, model, cond_dim))
  dtype = np.dtype(model.param_dtype)
  adapter: dict = {}
  for path, suffix in layout.items():
    w = np.asarray(tensors[prefix + suffix], np.float32)
    if path[-1] == "kernel":
      w = w.T
    elif path == ("gate_scale",):
      w = w.reshape(())
    common.set_path(adapter, path, w.astype(dtype))
  return {"adapter": adapter}, cond_dim


def _adapter_to_released(adapter: dict, prefix: str, gated: bool) -> dict[str, np.ndarray]:
  layout = _GATED_ADAPTER if gated else _UNGATED_ADAPTER
  out = {}
  for path, suffix in layout.items():
    w = np.asarray(common.get_path(adapter, path), np.float32)
    if path[-1] == "kernel":
      w = w.T
    elif path == ("gate_scale",):
      w = w.reshape(1)
    out[prefix + suffix] = w
  return out


# ------------------------------------------------------------------ loading

def _base(tensors, metadata, source, num_heads):
  """(model config, unscanned params) of the stage-1 part of a file."""
  model = t2s.infer_model_config(tensors, metadata, num_heads)
  model.scan_layers = False
  return model, t2s.amphion_to_params(tensors, model, source=source)


def _finish(model: ml_collections.ConfigDict, params: dict, scan_layers: bool):
  model.scan_layers = scan_layers
  if scan_layers:
    params = dict(params, backbone=common.stack_layers(params["backbone"], model.num_layers))
  return model, params


def _merge_trees(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _set_lora_fields(model: ml_collections.ConfigDict, rank: int = 0, alpha: float = 0.0,
                     dropout: float = 0.0, targets: tuple[str, ...] = lora_lib.TARGETS) -> None:
  model.lora_rank, model.lora_alpha, model.lora_dropout = rank, float(alpha), float(dropout)
  model.lora_targets = tuple(targets)


def _set_adapter_fields(model: ml_collections.ConfigDict, cond_dim: int = 0, gated: bool = True):
  model.cond_feature_dim, model.adapter_gated = cond_dim, gated


def load_released(base_path: str, lora_path: str | None = None, adapter_path: str | None = None, *,
                  merge: bool = True, lora_alpha: float | None = None, num_heads: int | None = None,
                  scan_layers: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a released Metis base plus optional LoRA and gated adapter files.

  Args:
    base_path: the Metis base (stage-1 keys only).
    lora_path: optional LoRA file (keys and shapes must match the base).
    adapter_path: optional adapter file (`model.cond_adapter.*`, gated).
    merge: fold the LoRA into the base kernels (W + alpha/r A B); the model
      config then has lora_rank 0 and decodes at exactly the base cost.
      Otherwise the params keep `lora_a`/`lora_b` leaves.
    lora_alpha: override; default the file's `config` metadata, else 2 r
      (every released LoRA: r 32 alpha 64, r 16 alpha 32).
    num_heads: attention heads (not recoverable from shapes; default the
      base file's metadata, else 16).
    scan_layers: params in the nn.scan layout (layers stacked).

  Returns:
    (model config with `cond_feature_dim`, `adapter_gated` and the `lora_*`
    fields, params as numpy float32).
  """
  tensors, metadata = common.load_safetensors(base_path)
  if any(k.startswith(_FULL_ADAPTER) for k in tensors):
    raise common.ConversionError(
        f"{base_path} holds condition-adapter keys (cond_adapter.*): it is a full fine-tuned "
        f"checkpoint; load it alone (finetune.load_full)")
  model, params = _base(tensors, metadata, base_path, num_heads)
  _set_adapter_fields(model)
  _set_lora_fields(model)
  if adapter_path:
    adapter_tensors, _ = common.load_safetensors(adapter_path)
    adapter, cond_dim = adapter_to_params(adapter_tensors, model, _RELEASED_ADAPTER, gated=True,
                                          source=adapter_path)
    params = dict(params, **adapter)
    _set_adapter_fields(model, cond_dim, gated=True)
  if lora_path:
    lora_tensors, lora_meta = common.load_safetensors(lora_path)
    tree, rank, targets = lora_to_params(lora_tensors, model, source=lora_path)
    meta = common.parse_config_metadata(lora_meta, lora_path)
    alpha = lora_alpha
    if alpha is None:
      alpha = meta.get("lora_alpha", RELEASED_ALPHA_PER_RANK * rank)
    dropout = meta.get("lora_dropout", RELEASED_LORA_DROPOUT)
    lora = lora_lib.LoraConfig(rank, float(alpha), float(dropout), targets)
    params = _merge_trees(params, tree)
    if merge:
      params = jax.tree_util.tree_map(np.asarray, lora_lib.merge_lora(params, lora))
    else:
      _set_lora_fields(model, rank, alpha, dropout, targets)
  return _finish(model, params, scan_layers)


def has_adapter_keys(path: str) -> bool:
  """Whether a safetensors file holds `cond_adapter.*` keys (read from its header only)."""
  try:
    with safetensors.safe_open(path, "numpy") as f:
      return any(k.startswith(_FULL_ADAPTER) for k in f.keys())
  except (OSError, safetensors.SafetensorError) as e:
    raise common.ConversionError(f"{path}: not a readable safetensors file ({e})") from e


def load_full(path: str, *, num_heads: int | None = None,
              scan_layers: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads one full fine-tuned checkpoint: stage-1 keys plus `cond_adapter.*`.

  The adapter is ungated (`cond_adapter.{0,2}`, L2S) or gated
  (`cond_adapter.{in_linear,out_linear,gate_scale}`); a file without adapter
  keys loads as the plain model.

  Returns:
    (model config with `cond_feature_dim`, `adapter_gated`, lora_rank 0;
    params as numpy).
  """
  tensors, metadata = common.load_safetensors(path)
  adapter_tensors = {k: v for k, v in tensors.items() if k.startswith(_FULL_ADAPTER)}
  rest = {k: v for k, v in tensors.items() if not k.startswith(_FULL_ADAPTER)}
  model, params = _base(rest, metadata, path, num_heads)
  _set_adapter_fields(model)
  _set_lora_fields(model)
  if adapter_tensors:
    gated = not any(k.startswith(_FULL_ADAPTER + "0.") for k in adapter_tensors)
    adapter, cond_dim = adapter_to_params(adapter_tensors, model, _FULL_ADAPTER, gated, source=path)
    params = dict(params, **adapter)
    _set_adapter_fields(model, cond_dim, gated)
  return _finish(model, params, scan_layers)


# ------------------------------------------------------------------ saving

def _unstacked(params: dict) -> dict:
  params = jax.tree_util.tree_map(np.asarray, dict(params))
  if "layers" in params["backbone"]:
    params["backbone"] = common.unstack_layers(params["backbone"])
  return params


def _split_lora(params: dict) -> tuple[dict, dict]:
  """(params without LoRA leaves, {(layer, module): (A, B)} in our layout)."""
  factors = {}
  backbone = {}
  for name, layer in params["backbone"].items():
    if not name.startswith("layers_"):
      backbone[name] = layer
      continue
    i = int(name[len("layers_"):])
    layer = jax.tree_util.tree_map(lambda x: x, layer)  # copy
    for module, (_, path, _) in _LORA_MODULES.items():
      node = common.get_path(layer, path)
      if lora_lib.LORA_A in node:
        factors[(i, module)] = (node.pop(lora_lib.LORA_A), node.pop(lora_lib.LORA_B))
    backbone[name] = layer
  return dict(params, backbone=backbone), factors


def _base_model(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  base = ml_collections.ConfigDict(model.to_dict())
  base.cond_feature_dim = 0
  base.lora_rank = 0
  return base


def save_released(base_path: str, params: dict, model: ml_collections.ConfigDict,
                  lora_path: str | None = None, adapter_path: str | None = None) -> None:
  """Writes the released three-file layout: base, LoRA and gated adapter.

  `params` are unmerged (with `lora_a`/`lora_b` leaves) when `lora_path` is
  given; `load_released(..., merge=False)` of the written files gives them
  back exactly.
  """
  params, factors = _split_lora(_unstacked(params))
  adapter = params.pop("adapter", None)
  if factors and not lora_path:
    raise common.ConversionError("the params hold a LoRA: give a LoRA output file (--lora)")
  if lora_path and not factors:
    raise common.ConversionError(f"no LoRA in the params to write to {lora_path}")
  if adapter is not None and not adapter_path:
    raise common.ConversionError("the params hold an adapter: give an adapter output file (--adapter)")
  if adapter_path and adapter is None:
    raise common.ConversionError(f"no adapter in the params to write to {adapter_path}")
  if adapter is not None and not model.adapter_gated:
    raise common.ConversionError("an ungated adapter has no released three-file layout; "
                                 "write a full checkpoint (save_full)")
  t2s.save_amphion(base_path, params, _base_model(model))
  if factors:
    tensors = {}
    for (i, module), (a, b) in sorted(factors.items()):
      a, b = _lora_to_released(a, b)
      tensors[_lora_key(i, module, "A")], tensors[_lora_key(i, module, "B")] = a, b
    targets = [t for t in lora_lib.TARGETS if any(m == t for _, m in factors)]
    meta = {"lora_r": int(model.lora_rank), "lora_alpha": float(model.lora_alpha),
            "lora_dropout": float(model.get("lora_dropout", RELEASED_LORA_DROPOUT)),
            "lora_target_modules": targets}
    common.save_safetensors(lora_path, tensors, {"config": json.dumps(meta)})
  if adapter is not None:
    common.save_safetensors(adapter_path, _adapter_to_released(adapter, _RELEASED_ADAPTER, True),
                            {"config": json.dumps({"cond_dim": int(model.cond_feature_dim)})})


def save_full(path: str, params: dict, model: ml_collections.ConfigDict) -> None:
  """Writes one full checkpoint: stage-1 keys plus `cond_adapter.*` (as `load_full` reads)."""
  params, factors = _split_lora(_unstacked(params))
  if factors:
    raise common.ConversionError("the params hold an unmerged LoRA: merge it (lora.merge_lora) "
                                 "or write the three-file layout (save_released)")
  adapter = params.pop("adapter", None)
  base = _base_model(model)
  tensors = t2s.params_to_amphion(params, base)
  if adapter is not None:
    tensors.update(_adapter_to_released(adapter, _FULL_ADAPTER, bool(model.adapter_gated)))
  meta = {"hidden_size": model.hidden_size, "num_layers": model.num_layers,
          "num_heads": model.num_heads, "cond_codebook_size": model.vocab_size,
          "use_phone_cond": model.use_phone_cond, "cond_dim": int(model.cond_feature_dim),
          "use_zero_gate_adapter": bool(model.adapter_gated)}
  common.save_safetensors(path, tensors, {"config": json.dumps(meta)})
