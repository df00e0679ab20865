"""Amphion T2S / Metis stage-1 safetensors <-> MetisModel parameters.

Amphion key layout (Linear weights `[out, in]`):
  cond_emb.weight [V, H]; mask_emb.weight [1, H]; to_logit.{weight [V, H], bias}
  phone_emb.weight [1024, H]                        (phone models only)
  diff_estimator.cond_mlp.{0,2}.{weight,bias}       (phone models only)
  diff_estimator.diff_step_mlp.{0,2}.{weight,bias}
  diff_estimator.norm.to_weight.{weight,bias}
  diff_estimator.layers.{i}.self_attn.{q,k,v,o}_proj.weight
  diff_estimator.layers.{i}.mlp.{gate,up,down}_proj.weight
  diff_estimator.layers.{i}.{input,post_attention}_layernorm.to_weight.{weight,bias}
"""

import json
import ml_collections
import numpy as np

from metis_jax import config_base
from metis_jax.conversion import common

# Per-layer entries: (amphion suffix, our path inside `layers_i`, kind).
_LAYER_ENTRIES = (
    ("self_attn.q_proj.weight", ("attention", "query", "kernel"), "qkv"),
    ("self_attn.k_proj.weight", ("attention", "key", "kernel"), "qkv"),
    ("self_attn.v_proj.weight", ("attention", "value", "kernel"), "qkv"),
    ("self_attn.o_proj.weight", ("attention", "out", "kernel"), "out"),
    ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "up", "kernel"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "down", "kernel"), "linear"),
    ("input_layernorm.to_weight.weight", ("input_norm", "to_weight", "kernel"), "linear"),
    ("input_layernorm.to_weight.bias", ("input_norm", "to_weight", "bias"), "same"),
    ("post_attention_layernorm.to_weight.weight", ("post_attention_norm", "to_weight", "kernel"), "linear"),
    ("post_attention_layernorm.to_weight.bias", ("post_attention_norm", "to_weight", "bias"), "same"),
)


def _mlp_entries(amphion_prefix: str, our_prefix: tuple) -> list:
  return [
      (f"{amphion_prefix}.0.weight", our_prefix + ("fc1", "kernel"), "linear"),
      (f"{amphion_prefix}.0.bias", our_prefix + ("fc1", "bias"), "same"),
      (f"{amphion_prefix}.2.weight", our_prefix + ("fc2", "kernel"), "linear"),
      (f"{amphion_prefix}.2.bias", our_prefix + ("fc2", "bias"), "same"),
  ]


def key_map(model: ml_collections.ConfigDict) -> list[tuple[str, tuple, str]]:
  """(amphion key, path in the unscanned param tree, kind) for every weight."""
  if model.cond_feature_dim:
    raise common.ConversionError(
        "condition-adapter weights (fine-tuned VC/SE/TSE/L2S files) are not converted by the "
        "stage-1 converter; convert the base model and load the adapter separately")
  entries = [
      ("cond_emb.weight", ("token_embed", "embedding"), "same"),
      ("mask_emb.weight", ("mask_embedding",), "row"),
      ("to_logit.weight", ("to_logits", "kernel"), "linear"),
      ("to_logit.bias", ("to_logits", "bias"), "same"),
  ]
  if model.use_phone_cond:
    entries.append(("phone_emb.weight", ("phone_embed", "embedding"), "same"))
    entries += _mlp_entries("diff_estimator.cond_mlp", ("phone_mlp",))
  return entries + backbone_key_map(model.num_layers)


def backbone_key_map(num_layers: int) -> list[tuple[str, tuple, str]]:
  """Entries of the shared `diff_estimator` backbone (time MLP, blocks, final norm)."""
  entries = [
      ("diff_estimator.norm.to_weight.weight", ("backbone", "final_norm", "to_weight", "kernel"), "linear"),
      ("diff_estimator.norm.to_weight.bias", ("backbone", "final_norm", "to_weight", "bias"), "same"),
  ]
  entries += _mlp_entries("diff_estimator.diff_step_mlp", ("backbone", "time_mlp"))
  for i in range(num_layers):
    for suffix, path, kind in _LAYER_ENTRIES:
      entries.append((f"diff_estimator.layers.{i}.{suffix}", ("backbone", f"layers_{i}") + path, kind))
  return entries


def expected_shapes(model: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Amphion key -> shape for a model config."""
  h, v = model.hidden_size, model.vocab_size
  shapes = {
      "cond_emb.weight": (v, h), "mask_emb.weight": (1, h),
      "to_logit.weight": (v, h), "to_logit.bias": (v,),
  }
  if model.use_phone_cond:
    shapes["phone_emb.weight"] = (model.phone_vocab_size, h)
    shapes.update(mlp_shapes("diff_estimator.cond_mlp", h, model.mlp_ratio * h))
  shapes.update(backbone_shapes(model))
  return shapes


def mlp_shapes(prefix: str, h: int, ff: int) -> dict[str, tuple]:
  return {f"{prefix}.0.weight": (ff, h), f"{prefix}.0.bias": (ff,),
          f"{prefix}.2.weight": (h, ff), f"{prefix}.2.bias": (h,)}


def backbone_shapes(model: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Amphion key -> shape for the shared backbone."""
  h, ff = model.hidden_size, model.mlp_ratio * model.hidden_size
  shapes = {"diff_estimator.norm.to_weight.weight": (h, h), "diff_estimator.norm.to_weight.bias": (h,)}
  shapes.update(mlp_shapes("diff_estimator.diff_step_mlp", h, ff))
  per_layer = {
      "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h),
      "self_attn.v_proj.weight": (h, h), "self_attn.o_proj.weight": (h, h),
      "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
      "input_layernorm.to_weight.weight": (h, h), "input_layernorm.to_weight.bias": (h,),
      "post_attention_layernorm.to_weight.weight": (h, h),
      "post_attention_layernorm.to_weight.bias": (h,),
  }
  for i in range(model.num_layers):
    shapes.update({f"diff_estimator.layers.{i}.{k}": s for k, s in per_layer.items()})
  return shapes


def to_ours(kind: str, w: np.ndarray, num_heads: int) -> np.ndarray:
  if kind == "same":
    return w
  if kind == "row":
    return w[0]
  if kind == "linear":
    return w.T
  if kind == "qkv":  # [heads*head_dim, H] -> [H, heads, head_dim]
    return w.T.reshape(w.shape[1], num_heads, -1)
  if kind == "out":  # [H, heads*head_dim] -> [heads, head_dim, H]
    return w.T.reshape(num_heads, -1, w.shape[0])
  raise ValueError(kind)


def to_amphion(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "same":
    return w
  if kind == "row":
    return w[None, :]
  if kind == "linear":
    return w.T
  if kind == "qkv":  # [H, heads, head_dim] -> [heads*head_dim, H]
    return w.reshape(w.shape[0], -1).T
  if kind == "out":  # [heads, head_dim, H] -> [H, heads*head_dim]
    return w.reshape(-1, w.shape[-1]).T
  raise ValueError(kind)


def ignored(key: str) -> bool:
  # Rotary buffers some torch versions save; recomputed here.
  return key.endswith("rotary_emb.inv_freq")


def amphion_to_params(tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict,
                      source: str = "state dict") -> dict:
  """Strictly converts an Amphion state dict (numpy) into a MetisModel param tree."""
  common.check_keys(source, tensors, expected_shapes(model), ignored)
  dtype = np.dtype(model.param_dtype)
  params: dict = {}
  for key, path, kind in key_map(model):
    common.set_path(params, path, to_ours(kind, np.asarray(tensors[key], np.float32), model.num_heads).astype(dtype))
  if model.scan_layers:
    params["backbone"] = common.stack_layers(params["backbone"], model.num_layers)
  return params


def params_to_amphion(params: dict, model: ml_collections.ConfigDict,
                      source: str = "model_config.json") -> dict[str, np.ndarray]:
  """MetisModel param tree -> Amphion state dict (float32 numpy).

  Raises:
    ConversionError: the parameters do not match `model` (`source`, e.g. a
      hand-edited model_config.json), naming the first mismatches.
  """
  try:
    entries, shapes = key_map(model), expected_shapes(model)
    check_heads(model, source)
  except (AttributeError, KeyError, TypeError) as e:
    raise common.ConversionError(f"{source} lacks or mistypes a model setting ({type(e).__name__}: {e}); "
                                 "restore the file written by the conversion") from None
  try:
    out = _params_to_amphion(params, entries)
  except (KeyError, IndexError, ValueError, TypeError) as e:
    raise common.ConversionError(f"the parameters do not match {source} ({type(e).__name__}: {e}); "
                                 "was the file edited? restore the one written by the conversion") from None
  wrong = [f"{k}: parameters give {tuple(v.shape)}, {source} implies {tuple(shapes[k])}"
           for k, v in out.items() if tuple(v.shape) != tuple(shapes[k])]
  if wrong:
    raise common.ConversionError(f"the parameters do not match {source} ({'; '.join(wrong[:3])}); "
                                 "was the file edited? restore the one written by the conversion")
  return out


def _params_to_amphion(params: dict, entries: list) -> dict[str, np.ndarray]:
  params = dict(params)
  backbone = {k: v for k, v in params["backbone"].items()}
  if "layers" in backbone:
    backbone = common.unstack_layers(backbone)
  params["backbone"] = backbone
  return {key: to_amphion(kind, np.asarray(common.get_path(params, path), np.float32))
          for key, path, kind in entries}


def infer_model_config(tensors: dict[str, np.ndarray], metadata: dict[str, str],
                       num_heads: int | None = None, source: str = "the file") -> ml_collections.ConfigDict:
  """Model config from a file's shapes (and its `config` metadata, if any).

  Width, vocabulary, depth, MLP ratio and the phone prefix follow from the
  shapes; the head count does not, so it comes from the metadata, the
  argument, or the released value (16).
  """
  model = config_base.model_config()
  meta = common.parse_config_metadata(metadata, source)
  if "cond_emb.weight" not in tensors:
    raise common.ConversionError(f"{source}: not an Amphion T2S/Metis stage-1 file: no `cond_emb.weight`")
  if np.ndim(tensors["cond_emb.weight"]) != 2:
    raise common.ConversionError(f"{source}: cond_emb.weight has shape {tuple(np.shape(tensors['cond_emb.weight']))}; "
                                 "a token embedding is [vocabulary, width]")
  model.vocab_size, model.hidden_size = (int(d) for d in tensors["cond_emb.weight"].shape)
  layer_ids = set()
  for key in tensors:
    if key.startswith("diff_estimator.layers."):
      index = key.split(".")[2]
      if not index.isdigit():
        raise common.ConversionError(f"{source}: unexpected key {key!r} (layer index {index!r} is not a number)")
      layer_ids.add(int(index))
  model.num_layers = max(layer_ids) + 1 if layer_ids else 0
  gate = tensors.get("diff_estimator.layers.0.mlp.gate_proj.weight")
  if gate is not None:
    model.mlp_ratio = int(gate.shape[0]) // model.hidden_size
  model.use_phone_cond = "phone_emb.weight" in tensors
  if model.use_phone_cond:
    model.phone_vocab_size = int(tensors["phone_emb.weight"].shape[0])
  try:
    model.num_heads = int(num_heads or meta.get("num_heads") or 16)
  except (TypeError, ValueError):
    raise common.ConversionError(f"{source}: num_heads {meta.get('num_heads')!r} in its metadata is not a "
                                 "number; give --num_heads") from None
  check_heads(model, source)
  model.dtype = "float32"
  return model


def check_heads(model: ml_collections.ConfigDict, source: str) -> None:
  """Raises ConversionError unless the head count is positive and divides the width."""
  if model.num_heads <= 0 or model.hidden_size % model.num_heads:
    divisors = [d for d in (1, 2, 4, 8, 12, 16, 20, 24, 32) if model.hidden_size % d == 0]
    raise common.ConversionError(
        f"{source}: {model.num_heads} attention heads do not divide the width {model.hidden_size}; "
        f"give --num_heads as one of {divisors}")


def load_amphion(path: str, num_heads: int | None = None, scan_layers: bool = True,
                 model: ml_collections.ConfigDict | None = None):
  """Reads a released safetensors file -> (model config, params).

  With `model` given, the file must match it exactly; otherwise the config is
  inferred from the file.
  """
  tensors, metadata = common.load_safetensors(path)
  if model is None:
    model = infer_model_config(tensors, metadata, num_heads, source=path)
    model.scan_layers = scan_layers
  return model, amphion_to_params(tensors, model, source=path)


def save_amphion(path: str, params: dict, model: ml_collections.ConfigDict) -> None:
  """Writes params in the Amphion layout (with the model config as metadata)."""
  meta = {"config": json.dumps({"hidden_size": model.hidden_size, "num_layers": model.num_layers,
                                "num_heads": model.num_heads, "cond_codebook_size": model.vocab_size,
                                "use_phone_cond": model.use_phone_cond})}
  common.save_safetensors(path, params_to_amphion(params, model), meta)

