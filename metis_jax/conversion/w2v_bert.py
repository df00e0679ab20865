"""`facebook/w2v-bert-2.0` (Hugging Face `Wav2Vec2BertModel`) safetensors <-> `w2v_bert.W2VBert` parameters,
and the layer-17 normalization statistics of Metis/MaskGCT.

Hugging Face key layout (Linear weights `[out, in]`, Conv1d `[out, in/groups, k]`):
  feature_projection.layer_norm.{weight, bias} [160]
  feature_projection.projection.{weight [H, 160], bias [H]}
  encoder.layers.{i}.{ffn1,ffn2}_layer_norm.{weight, bias}
  encoder.layers.{i}.{ffn1,ffn2}.intermediate_dense.{weight [I, H], bias [I]}
  encoder.layers.{i}.{ffn1,ffn2}.output_dense.{weight [H, I], bias [H]}
  encoder.layers.{i}.self_attn_layer_norm.{weight, bias}
  encoder.layers.{i}.self_attn.linear_{q,k,v,out}.{weight [H, H], bias [H]}
  encoder.layers.{i}.self_attn.distance_embedding.weight [73, head_dim]
  encoder.layers.{i}.conv_module.{layer_norm, depthwise_layer_norm}.{weight, bias}
  encoder.layers.{i}.conv_module.pointwise_conv1.weight [2H, H, 1]
  encoder.layers.{i}.conv_module.depthwise_conv.weight [H, 1, 31]
  encoder.layers.{i}.conv_module.pointwise_conv2.weight [H, H, 1]
  encoder.layers.{i}.final_layer_norm.{weight, bias}
  masked_spec_embed [H]                   (SpecAugment, training only: ignored)

Blocks i >= `config.output_layer` (18..24 of the release) are deliberately
ignored; everything else must match exactly (`common.check_keys`).

Statistics: Amphion ships `wav2vec2bert_stats.pt`, a torch zip holding
{"mean": f32[1024], "var": f32[1024]}. `convert_stats` reads it with
`torch.load(weights_only=True)` (no arbitrary unpickling; torch installed by
hand for this one conversion, in no extra of setup.py) and writes an .npz;
`load_stats` reads that .npz (numpy, `allow_pickle=False`).
"""

import json
import os
import re

import numpy as np

from metis_jax.models import w2v_bert
from metis_jax.conversion import common

_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.")
IGNORED_KEYS = ("masked_spec_embed",)


def _ln(hf_prefix: str, path: tuple) -> list:
  return [(f"{hf_prefix}.weight", path + ("scale",), "same"), (f"{hf_prefix}.bias", path + ("bias",), "same")]


def _linear(hf_prefix: str, path: tuple) -> list:
  return [(f"{hf_prefix}.weight", path + ("kernel",), "linear"), (f"{hf_prefix}.bias", path + ("bias",), "same")]


def _layer_entries(i: int) -> list:
  hf, ours = f"encoder.layers.{i}", (f"layers_{i}",)
  entries = []
  for ffn in ("ffn1", "ffn2"):
    entries += _ln(f"{hf}.{ffn}_layer_norm", ours + (f"{ffn}_layer_norm",))
    entries += _linear(f"{hf}.{ffn}.intermediate_dense", ours + (ffn, "intermediate_dense"))
    entries += _linear(f"{hf}.{ffn}.output_dense", ours + (ffn, "output_dense"))
  entries += _ln(f"{hf}.self_attn_layer_norm", ours + ("self_attn_layer_norm",))
  attn = ours + ("self_attn",)
  for hf_name, name in (("linear_q", "query"), ("linear_k", "key"), ("linear_v", "value")):
    entries += [(f"{hf}.self_attn.{hf_name}.weight", attn + (name, "kernel"), "qkv"),
                (f"{hf}.self_attn.{hf_name}.bias", attn + (f"{name}_bias",), "heads")]
  entries += [(f"{hf}.self_attn.linear_out.weight", attn + ("out", "kernel"), "out"),
              (f"{hf}.self_attn.linear_out.bias", attn + ("out_bias",), "same"),
              (f"{hf}.self_attn.distance_embedding.weight", attn + ("distance_embedding",), "same")]
  conv = ours + ("conv_module",)
  entries += _ln(f"{hf}.conv_module.layer_norm", conv + ("layer_norm",))
  entries += [(f"{hf}.conv_module.pointwise_conv1.weight", conv + ("pointwise_conv1", "kernel"), "glu"),
              (f"{hf}.conv_module.depthwise_conv.weight", conv + ("depthwise_conv",), "depthwise"),
              (f"{hf}.conv_module.pointwise_conv2.weight", conv + ("pointwise_conv2", "kernel"), "pointwise")]
  entries += _ln(f"{hf}.conv_module.depthwise_layer_norm", conv + ("depthwise_layer_norm",))
  entries += _ln(f"{hf}.final_layer_norm", ours + ("final_layer_norm",))
  return entries


def key_map(config: w2v_bert.W2VBertConfig) -> list[tuple[str, tuple, str]]:
  """(Hugging Face key, path in the unscanned param tree, kind) for every converted weight."""
  entries = _ln("feature_projection.layer_norm", ("feature_layer_norm",))
  entries += _linear("feature_projection.projection", ("feature_projection",))
  for i in range(config.output_layer):
    entries += _layer_entries(i)
  return entries


def expected_shapes(config: w2v_bert.W2VBertConfig) -> dict[str, tuple]:
  """Hugging Face key -> shape for the blocks this config computes."""
  h, i, d, k = config.hidden_size, config.intermediate_size, config.head_dim, config.conv_kernel_size
  shapes = {"feature_projection.layer_norm.weight": (config.input_dim,),
            "feature_projection.layer_norm.bias": (config.input_dim,),
            "feature_projection.projection.weight": (h, config.input_dim),
            "feature_projection.projection.bias": (h,)}
  per_layer = {"self_attn.distance_embedding.weight": (config.num_positions, d),
               "conv_module.pointwise_conv1.weight": (2 * h, h, 1),
               "conv_module.depthwise_conv.weight": (h, 1, k),
               "conv_module.pointwise_conv2.weight": (h, h, 1)}
  for ln in ("ffn1_layer_norm", "ffn2_layer_norm", "self_attn_layer_norm", "conv_module.layer_norm",
             "conv_module.depthwise_layer_norm", "final_layer_norm"):
    per_layer.update({f"{ln}.weight": (h,), f"{ln}.bias": (h,)})
  for ffn in ("ffn1", "ffn2"):
    per_layer.update({f"{ffn}.intermediate_dense.weight": (i, h), f"{ffn}.intermediate_dense.bias": (i,),
                      f"{ffn}.output_dense.weight": (h, i), f"{ffn}.output_dense.bias": (h,)})
  for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
    per_layer.update({f"self_attn.{name}.weight": (h, h), f"self_attn.{name}.bias": (h,)})
  for layer in range(config.output_layer):
    shapes.update({f"encoder.layers.{layer}.{key}": s for key, s in per_layer.items()})
  return shapes


def _to_ours(kind: str, w: np.ndarray, config: w2v_bert.W2VBertConfig) -> np.ndarray:
  h, heads = config.hidden_size, config.num_heads
  if kind == "same":
    return w
  if kind == "linear":  # [out, in] -> [in, out]
    return w.T
  if kind == "qkv":  # [heads*head_dim, H] -> [H, heads, head_dim]
    return w.T.reshape(h, heads, -1)
  if kind == "heads":  # [heads*head_dim] -> [heads, head_dim]
    return w.reshape(heads, -1)
  if kind == "out":  # [H, heads*head_dim] -> [heads, head_dim, H]
    return w.T.reshape(heads, -1, h)
  if kind == "glu":  # [2H, H, 1] -> [H, 2, H] (value half, gate half)
    return w[:, :, 0].T.reshape(h, 2, h)
  if kind == "depthwise":  # [H, 1, K] -> [K, H]
    return w[:, 0, :].T
  if kind == "pointwise":  # [H_out, H_in, 1] -> [H_in, H_out]
    return w[:, :, 0].T
  raise ValueError(kind)


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "same":
    return w
  if kind == "linear":
    return w.T
  if kind == "qkv":
    return w.reshape(w.shape[0], -1).T
  if kind == "heads":
    return w.reshape(-1)
  if kind == "out":
    return w.reshape(-1, w.shape[-1]).T
  if kind == "glu":
    return w.reshape(w.shape[0], -1).T[:, :, None]
  if kind == "depthwise":
    return w.T[:, None, :]
  if kind == "pointwise":
    return w.T[:, :, None]
  raise ValueError(kind)


def _ignored(config: w2v_bert.W2VBertConfig):
  def ignored(key: str) -> bool:
    if key in IGNORED_KEYS:
      return True
    m = _LAYER_RE.match(key)
    return bool(m) and int(m.group(1)) >= config.output_layer
  return ignored


def hf_to_params(tensors: dict[str, np.ndarray], config: w2v_bert.W2VBertConfig,
                 source: str = "state dict") -> dict:
  """Strictly converts a Hugging Face `Wav2Vec2BertModel` state dict (numpy) into `W2VBert` params.

  Raises `common.ConversionError` listing missing, unexpected and mis-shaped
  keys; blocks >= `config.output_layer` and `masked_spec_embed` are ignored.
  """
  common.check_keys(source, tensors, expected_shapes(config), _ignored(config))
  dtype = np.dtype(config.param_dtype)
  params: dict = {}
  for key, path, kind in key_map(config):
    common.set_path(params, path,
                    _to_ours(kind, np.asarray(tensors[key], np.float32), config).astype(dtype, copy=False))
  if config.scan_layers:
    params = common.stack_layers(params, config.output_layer)
  return params


def params_to_hf(params: dict, config: w2v_bert.W2VBertConfig) -> dict[str, np.ndarray]:
  """`W2VBert` params -> Hugging Face state dict (float32 numpy) of the computed blocks only."""
  params = dict(params)
  if "layers" in params:
    params = common.unstack_layers(params)
  return {key: np.ascontiguousarray(_to_hf(kind, np.asarray(common.get_path(params, path), np.float32)))
          for key, path, kind in key_map(config)}


def infer_config(tensors: dict[str, np.ndarray], num_heads: int = 16, output_layer: int = 17,
                 **overrides) -> w2v_bert.W2VBertConfig:
  """Config from a file's shapes (width, FFN, depth, kernel, distance range; heads from the argument)."""
  if "feature_projection.projection.weight" not in tensors:
    raise common.ConversionError("not a Wav2Vec2Bert file: no `feature_projection.projection.weight`")
  hidden, input_dim = (int(d) for d in tensors["feature_projection.projection.weight"].shape)
  layers = {int(m.group(1)) for m in map(_LAYER_RE.match, tensors) if m}
  num_layers = max(layers) + 1 if layers else 0
  base = dict(input_dim=input_dim, hidden_size=hidden, num_layers=num_layers, num_heads=num_heads,
              output_layer=min(output_layer, num_layers))
  ffn = tensors.get("encoder.layers.0.ffn1.intermediate_dense.weight")
  if ffn is not None:
    base["intermediate_size"] = int(ffn.shape[0])
  conv = tensors.get("encoder.layers.0.conv_module.depthwise_conv.weight")
  if conv is not None:
    base["conv_kernel_size"] = int(conv.shape[-1])
  base.update(overrides)
  try:
    return w2v_bert.W2VBertConfig(**base)
  except ValueError as e:
    raise common.ConversionError(f"cannot build a W2VBertConfig from the file: {e}") from e


def load_hf(path: str, config: w2v_bert.W2VBertConfig | None = None,
            hf_config_path: str | None = None) -> tuple[w2v_bert.W2VBertConfig, dict]:
  """Reads `model.safetensors` of `facebook/w2v-bert-2.0` -> (config, params).

  With `config` the file must match it; otherwise the config comes from the
  Hugging Face `config.json` beside the file (or `hf_config_path`), else from
  the shapes with the released defaults (16 heads, layer 17).
  """
  tensors, _ = common.load_safetensors(path)
  if config is None:
    hf_config_path = hf_config_path or os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(hf_config_path):
      with open(hf_config_path) as f:
        config = w2v_bert.W2VBertConfig.from_hf_config(json.load(f))
    else:
      config = infer_config(tensors)
  return config, hf_to_params(tensors, config, source=path)


def save_hf(path: str, params: dict, config: w2v_bert.W2VBertConfig) -> None:
  """Writes params in the Hugging Face layout (computed blocks only)."""
  common.save_safetensors(path, params_to_hf(params, config),
                          {"format": "pt", "output_layer": str(config.output_layer)})


# ----------------------------------------------------------------------------- statistics


def convert_stats(pt_path: str, npz_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Amphion's `wav2vec2bert_stats.pt` -> an .npz with float32 `mean` and `var`.

  Uses `torch.load(weights_only=True)`, which refuses pickled objects other
  than tensors and plain containers. This is the one place metis_jax uses
  torch, imported here only and installed by hand (`pip install torch`; no
  extra of setup.py names it). Returns (mean, var).

  Raises:
    ImportError: torch is not installed (one line saying what to install).
    common.ConversionError: the file is not a plain {"mean", "var"} tensor dict.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{pt_path}: reading a .pt statistics file needs torch, which is not installed; "
                      f"pip install torch (the CPU build is enough), or convert on a machine that "
                      f"has it and copy the .npz") from e
  try:
    stats = torch.load(pt_path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError, RuntimeError, OSError, ...
    raise common.ConversionError(f"{pt_path}: not a plain tensor checkpoint ({type(e).__name__}: {e})") from e
  if not isinstance(stats, dict) or not {"mean", "var"} <= set(stats):
    got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
    raise common.ConversionError(f"{pt_path}: expected a dict with 'mean' and 'var', got {got}")
  mean = np.asarray(stats["mean"].detach().cpu().numpy(), np.float32)
  var = np.asarray(stats["var"].detach().cpu().numpy(), np.float32)
  _check_stats(pt_path, mean, var, mean.shape[-1] if mean.ndim else 0)
  np.savez(npz_path, mean=mean, var=var)
  return mean, var


def _check_stats(source: str, mean: np.ndarray, var: np.ndarray, hidden_size: int) -> None:
  problems = []
  for name, x in (("mean", mean), ("var", var)):
    if x.shape != (hidden_size,):
      problems.append(f"{name}: shape {x.shape}, expected ({hidden_size},)")
    elif not np.all(np.isfinite(x)):
      problems.append(f"{name}: non-finite values")
  if not problems and not np.all(var > 0):
    problems.append("var: non-positive entries")
  if problems:
    raise common.ConversionError(f"{source}: bad normalization statistics:\n  " + "\n  ".join(problems))


def load_stats(npz_path: str, hidden_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(mean, var), float32 `[hidden_size]` each, from an .npz written by `convert_stats`.

  Features are normalized as (h - mean) / sqrt(var). Raises
  `common.ConversionError` if either array is missing, mis-shaped,
  non-finite, or var is not positive.
  """
  try:
    with np.load(npz_path, allow_pickle=False) as f:
      missing = [k for k in ("mean", "var") if k not in f.files]
      if missing:
        raise common.ConversionError(f"{npz_path}: missing arrays {missing} (has {sorted(f.files)})")
      mean, var = np.asarray(f["mean"], np.float32), np.asarray(f["var"], np.float32)
  except (OSError, ValueError) as e:
    if isinstance(e, common.ConversionError):
      raise
    raise common.ConversionError(f"{npz_path}: not a readable .npz ({e})") from e
  _check_stats(npz_path, mean, var, hidden_size)
  return mean, var
