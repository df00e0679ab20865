"""Amphion semantic codec (RepCodec) safetensors <-> SemanticCodec parameters.

Released layout (`semantic_codec/model.safetensors`; Linear `[out, in]`,
Conv1d `[out, in / groups, k]`, old-style weight norm as weight_g/weight_v):
  {encoder,decoder}.0.embed.{weight [dim, D, 7], bias}
  {encoder,decoder}.0.norm.{weight, bias}
  {encoder,decoder}.0.convnext.{i}.dwconv.{weight [dim, 1, 7], bias}
  {encoder,decoder}.0.convnext.{i}.norm.{weight, bias}
  {encoder,decoder}.0.convnext.{i}.pwconv1.{weight [inter, dim], bias}
  {encoder,decoder}.0.convnext.{i}.pwconv2.{weight [dim, inter], bias}
  {encoder,decoder}.0.convnext.{i}.gamma [dim]
  {encoder,decoder}.0.final_layer_norm.{weight, bias}
  {encoder,decoder}.1.{weight [D, dim], bias}
  quantizer.quantizers.{q}.{in_project,out_project}.{weight_g, weight_v, bias}
  quantizer.quantizers.{q}.codebook.weight [K, d]

Weight norm is folded on the way in (w = v * g / ||v||, the norm over every
axis but 0) unless the model keeps the (v, g) parametrization
(`weight_norm=True`); on the way out a folded kernel is written as v = w,
g = ||w||, which describes the same function (and converts back to the same
bits).

The helpers here (entry tables, kinds, the strict check) are shared with the
acoustic-codec converter.
"""

import dataclasses
import json

import jax
import numpy as np

from metis_jax.models import semantic_codec
from metis_jax.conversion import common

# Entry kinds: how one of our parameters relates to the file.
#   same   identical array
#   linear Dense kernel [in, out] <-> Linear weight [out, in]
#   conv   Conv1d kernel [k, in, out] <-> weight [out, in, k]
#   wn     weight-normed Conv1d: our module path <-> `<key>.weight_g`, `<key>.weight_v`
#   snake  alpha [C] <-> [1, C, 1]


def vocos_entries(prefix: str, path: tuple, num_layers: int) -> list:
  """Entries of a VocosBackbone at file prefix `prefix` / our `path`."""
  entries = [
      (f"{prefix}.embed.weight", path + ("embed", "kernel"), "conv"),
      (f"{prefix}.embed.bias", path + ("embed", "bias"), "same"),
      (f"{prefix}.norm.weight", path + ("norm", "scale"), "same"),
      (f"{prefix}.norm.bias", path + ("norm", "bias"), "same"),
      (f"{prefix}.final_layer_norm.weight", path + ("final_norm", "scale"), "same"),
      (f"{prefix}.final_layer_norm.bias", path + ("final_norm", "bias"), "same"),
  ]
  for i in range(num_layers):
    p, q = f"{prefix}.convnext.{i}", path + (f"layers_{i}",)
    entries += [
        (f"{p}.dwconv.weight", q + ("dwconv", "kernel"), "conv"),
        (f"{p}.dwconv.bias", q + ("dwconv", "bias"), "same"),
        (f"{p}.norm.weight", q + ("norm", "scale"), "same"),
        (f"{p}.norm.bias", q + ("norm", "bias"), "same"),
        (f"{p}.pwconv1.weight", q + ("pwconv1", "kernel"), "linear"),
        (f"{p}.pwconv1.bias", q + ("pwconv1", "bias"), "same"),
        (f"{p}.pwconv2.weight", q + ("pwconv2", "kernel"), "linear"),
        (f"{p}.pwconv2.bias", q + ("pwconv2", "bias"), "same"),
        (f"{p}.gamma", q + ("gamma",), "same"),
    ]
  return entries


def wn_conv_entries(key: str, path: tuple) -> list:
  """A weight-normed Conv1d with bias."""
  return [(key, path, "wn"), (f"{key}.bias", path + ("bias",), "same")]


def rvq_entries(prefix: str, path: tuple, num_quantizers: int) -> list:
  entries = []
  for q in range(num_quantizers):
    p, o = f"{prefix}.quantizers.{q}", path + (f"layers_{q}",)
    entries += wn_conv_entries(f"{p}.in_project", o + ("in_project",))
    entries += wn_conv_entries(f"{p}.out_project", o + ("out_project",))
    entries.append((f"{p}.codebook.weight", o + ("codebook",), "same"))
  return entries


def key_map(config: semantic_codec.SemanticCodecConfig) -> list:
  """(file key, path in the unscanned param tree, kind) for every weight."""
  entries = []
  for part in ("encoder", "decoder"):
    entries += vocos_entries(f"{part}.0", (part, "backbone"), config.vocos_num_layers)
    entries += [(f"{part}.1.weight", (part, "out", "kernel"), "linear"),
                (f"{part}.1.bias", (part, "out", "bias"), "same")]
  return entries + rvq_entries("quantizer", ("quantizer",), config.num_quantizers)


# ----------------------------------------------------------------------------- kinds


def _wn_fold(v: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Torch weight_v [out, in, k], weight_g [out, 1, 1] -> folded torch weight."""
  v64 = v.astype(np.float64)
  # The norm is rounded to float32 first so that an exported (v = w, g = ||w||)
  # pair folds back to w bit for bit.
  norm = np.sqrt(np.sum(np.square(v64), axis=tuple(range(1, v.ndim)), keepdims=True)).astype(np.float32)
  scale = g.astype(np.float64).reshape(norm.shape) / norm.astype(np.float64)
  return (v64 * scale).astype(np.float32)


def _wn_unfold(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Folded torch weight -> (weight_g, weight_v)."""
  norm = np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=tuple(range(1, w.ndim)), keepdims=True))
  return norm.astype(np.float32), w.astype(np.float32)


def _conv_to_ours(w):
  return np.transpose(w, (2, 1, 0))


def _conv_to_file(w):
  return np.transpose(w, (2, 1, 0))


def to_ours(entries: list, tensors: dict, weight_norm: bool) -> dict:
  """File tensors -> nested (unscanned) param tree."""
  params: dict = {}
  for key, path, kind in entries:
    if kind == "wn":
      v, g = tensors[f"{key}.weight_v"], tensors[f"{key}.weight_g"]
      if weight_norm:
        common.set_path(params, path + ("kernel_v",), _conv_to_ours(np.asarray(v, np.float32)))
        common.set_path(params, path + ("kernel_g",), np.asarray(g, np.float32).reshape(-1))
      else:
        common.set_path(params, path + ("kernel",), _conv_to_ours(_wn_fold(v, g)))
      continue
    w = np.asarray(tensors[key], np.float32)
    if kind == "linear":
      w = w.T
    elif kind == "conv":
      w = _conv_to_ours(w)
    elif kind == "snake":
      w = w.reshape(-1)
    common.set_path(params, path, w)
  return params


def to_file(entries: list, params: dict) -> dict:
  """Nested (unscanned) param tree -> file tensors (float32)."""
  out = {}
  for key, path, kind in entries:
    if kind == "wn":
      node = common.get_path(params, path)
      if "kernel" in node:
        g, v = _wn_unfold(_conv_to_file(np.asarray(node["kernel"], np.float32)))
      else:
        v = _conv_to_file(np.asarray(node["kernel_v"], np.float32))
        g = np.asarray(node["kernel_g"], np.float32).reshape(-1, *([1] * (v.ndim - 1)))
      out[f"{key}.weight_g"], out[f"{key}.weight_v"] = g, v
      continue
    w = np.asarray(common.get_path(params, path), np.float32)
    if kind == "linear":
      w = w.T
    elif kind == "conv":
      w = _conv_to_file(w)
    elif kind == "snake":
      w = w.reshape(1, -1, 1)
    out[key] = w
  return out


def file_shapes(entries: list, shapes: dict) -> dict:
  """Expected file shapes from our (unscanned) param shapes tree."""
  out = {}
  for key, path, kind in entries:
    if kind == "wn":
      node = common.get_path(shapes, path)
      k = node["kernel"] if "kernel" in node else node["kernel_v"]
      k = tuple(k.shape)
      out[f"{key}.weight_v"] = (k[2], k[1], k[0])
      out[f"{key}.weight_g"] = (k[2], 1, 1)
      continue
    s = tuple(common.get_path(shapes, path).shape)
    if kind == "linear":
      s = s[::-1]
    elif kind == "conv":
      s = (s[2], s[1], s[0])
    elif kind == "snake":
      s = (1, s[0], 1)
    out[key] = s
  return out


def unscan(params: dict, scanned_paths: list) -> dict:
  """Unstacks the `layers` subtree at each path (nn.scan layout -> layers_i)."""
  params = jax.tree_util.tree_map(lambda x: x, params)  # a copy of the containers
  for path in scanned_paths:
    node = common.get_path(params, path)
    if "layers" in node:
      common.set_path(params, path, common.unstack_layers(dict(node)))
  return params


def rescan(params: dict, scanned_paths: list, num_layers: int) -> dict:
  for path in scanned_paths:
    common.set_path(params, path, common.stack_layers(common.get_path(params, path), num_layers))
  return params


# ----------------------------------------------------------------------------- semantic codec

_BACKBONES = [("encoder", "backbone"), ("decoder", "backbone")]


def _unscanned_shapes(config: semantic_codec.SemanticCodecConfig) -> dict:
  flat = dataclasses.replace(config, scan_layers=False)
  return semantic_codec.abstract_params(semantic_codec.SemanticCodec(flat))


def expected_shapes(config: semantic_codec.SemanticCodecConfig) -> dict:
  """File key -> shape for a model config."""
  return file_shapes(key_map(config), _unscanned_shapes(config))


def amphion_to_params(tensors: dict, config: semantic_codec.SemanticCodecConfig,
                      source: str = "state dict") -> dict:
  """Strictly converts a released state dict (numpy) into SemanticCodec params."""
  common.check_keys(source, tensors, expected_shapes(config))
  params = to_ours(key_map(config), tensors, config.weight_norm)
  dtype = np.dtype(config.param_dtype)
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  if config.scan_layers:
    params = rescan(params, _BACKBONES, config.vocos_num_layers)
  return params


def params_to_amphion(params: dict, config: semantic_codec.SemanticCodecConfig) -> dict:
  """SemanticCodec params -> released state dict (float32 numpy)."""
  return to_file(key_map(config), unscan(params, _BACKBONES))


def infer_config(tensors: dict, metadata: dict | None = None, **overrides) -> semantic_codec.SemanticCodecConfig:
  """Model config from a file's shapes."""
  if "encoder.0.embed.weight" not in tensors:
    raise common.ConversionError("not an Amphion semantic codec file: no `encoder.0.embed.weight`")
  dim, hidden, _ = tensors["encoder.0.embed.weight"].shape
  layers = {int(k.split(".")[3]) for k in tensors if k.startswith("encoder.0.convnext.")}
  quantizers = {int(k.split(".")[2]) for k in tensors if k.startswith("quantizer.quantizers.")}
  cb = tensors.get("quantizer.quantizers.0.codebook.weight")
  inter = tensors.get("encoder.0.convnext.0.pwconv1.weight")
  kwargs = dict(hidden_size=int(hidden), vocos_dim=int(dim),
                vocos_num_layers=max(layers) + 1 if layers else 0,
                num_quantizers=max(quantizers) + 1 if quantizers else 0)
  if cb is not None:
    kwargs.update(codebook_size=int(cb.shape[0]), codebook_dim=int(cb.shape[1]))
  if inter is not None:
    kwargs["vocos_intermediate_dim"] = int(inter.shape[0])
  kwargs.update(overrides)
  return semantic_codec.SemanticCodecConfig(**kwargs)


def load_amphion(path: str, config: semantic_codec.SemanticCodecConfig | None = None, **overrides):
  """Reads a released file -> (config, params). With `config` the file must match it."""
  tensors, metadata = common.load_safetensors(path)
  if config is None:
    config = infer_config(tensors, metadata, **overrides)
  return config, amphion_to_params(tensors, config, source=path)


def save_amphion(path: str, params: dict, config: semantic_codec.SemanticCodecConfig) -> None:
  meta = {"config": json.dumps({
      "codebook_size": config.codebook_size, "hidden_size": config.hidden_size,
      "codebook_dim": config.codebook_dim, "vocos_dim": config.vocos_dim,
      "vocos_intermediate_dim": config.vocos_intermediate_dim,
      "vocos_num_layers": config.vocos_num_layers, "num_quantizers": config.num_quantizers})}
  common.save_safetensors(path, params_to_amphion(params, config), meta)
