"""Amphion S2A (MaskGCT semantic-to-acoustic) safetensors <-> S2AModel parameters.

Amphion keys: token_emb.{q}.weight [C, H] and to_logits.{q}.{weight [C, H], bias}
for each codec layer q; layer_emb.weight [Q, H]; mask_emb.weight [1, H];
cond_emb.weight [V, H]; diff_estimator.cond_mlp.{0,2}.*; and the backbone as in
T2S (`t2s.backbone_key_map`). The empty `diff_estimator.embed_tokens.weight`
that the release carries (shape [0, 256], left from a stub config) is ignored.
"""

import json

import ml_collections
import numpy as np

from metis_jax import config_base
from metis_jax.conversion import common, t2s

IGNORED_KEYS = ("diff_estimator.embed_tokens.weight",)


def _ignored(key: str) -> bool:
  return key in IGNORED_KEYS or t2s.ignored(key)


def expected_shapes(model: ml_collections.ConfigDict) -> dict[str, tuple]:
  h, c, q = model.hidden_size, model.vocab_size, model.num_quantizers
  shapes = {"layer_emb.weight": (q, h), "mask_emb.weight": (1, h),
            "cond_emb.weight": (model.cond_vocab_size, h)}
  for i in range(q):
    shapes.update({f"token_emb.{i}.weight": (c, h), f"to_logits.{i}.weight": (c, h),
                   f"to_logits.{i}.bias": (c,)})
  shapes.update(t2s.mlp_shapes("diff_estimator.cond_mlp", h, model.mlp_ratio * h))
  shapes.update(t2s.backbone_shapes(model))
  return shapes


def _key_map(model):
  entries = [("mask_emb.weight", ("mask_embedding",), "row"),
             ("layer_emb.weight", ("layer_embedding",), "same"),
             ("cond_emb.weight", ("cond_embed", "embedding"), "same")]
  entries += t2s._mlp_entries("diff_estimator.cond_mlp", ("cond_mlp",))
  return entries + t2s.backbone_key_map(model.num_layers)


def amphion_to_params(tensors: dict[str, np.ndarray], model: ml_collections.ConfigDict,
                      source: str = "state dict") -> dict:
  """Strictly converts an Amphion S2A state dict into an S2AModel param tree."""
  common.check_keys(source, tensors, expected_shapes(model), _ignored)
  dtype = np.dtype(model.param_dtype)
  f32 = lambda k: np.asarray(tensors[k], np.float32)
  params: dict = {}
  for key, path, kind in _key_map(model):
    common.set_path(params, path, t2s.to_ours(kind, f32(key), model.num_heads).astype(dtype))
  q = range(model.num_quantizers)
  params["token_embedding"] = np.stack([f32(f"token_emb.{i}.weight") for i in q]).astype(dtype)
  params["logits_kernel"] = np.stack([f32(f"to_logits.{i}.weight").T for i in q]).astype(dtype)
  params["logits_bias"] = np.stack([f32(f"to_logits.{i}.bias") for i in q]).astype(dtype)
  if model.scan_layers:
    params["backbone"] = common.stack_layers(params["backbone"], model.num_layers)
  return params


def params_to_amphion(params: dict, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """S2AModel param tree -> Amphion state dict (float32 numpy)."""
  params = dict(params)
  if "layers" in params["backbone"]:
    params["backbone"] = common.unstack_layers(dict(params["backbone"]))
  out = {key: t2s.to_amphion(kind, np.asarray(common.get_path(params, path), np.float32))
         for key, path, kind in _key_map(model)}
  for i in range(model.num_quantizers):
    out[f"token_emb.{i}.weight"] = np.asarray(params["token_embedding"][i], np.float32)
    out[f"to_logits.{i}.weight"] = np.asarray(params["logits_kernel"][i], np.float32).T
    out[f"to_logits.{i}.bias"] = np.asarray(params["logits_bias"][i], np.float32)
  return out


def infer_model_config(tensors, metadata, num_heads=None) -> ml_collections.ConfigDict:
  """S2A model config from a file's shapes (heads from metadata/argument/16)."""
  if "layer_emb.weight" not in tensors or "token_emb.0.weight" not in tensors:
    raise common.ConversionError("not an Amphion S2A file: no `layer_emb.weight`/`token_emb.0.weight`")
  meta = common.parse_config_metadata(metadata, "the S2A file")
  model = config_base.model_config()
  model.kind = "s2a"
  model.num_quantizers, model.hidden_size = (int(d) for d in tensors["layer_emb.weight"].shape)
  model.vocab_size = int(tensors["token_emb.0.weight"].shape[0])
  model.cond_vocab_size = int(tensors["cond_emb.weight"].shape[0])
  layer_ids = {int(k.split(".")[2]) for k in tensors if k.startswith("diff_estimator.layers.")}
  model.num_layers = max(layer_ids) + 1 if layer_ids else 0
  model.mlp_ratio = int(tensors["diff_estimator.layers.0.mlp.gate_proj.weight"].shape[0]) // model.hidden_size
  model.num_heads = int(num_heads or meta.get("num_heads") or 16)
  model.predicts_first_layer = bool(meta.get("predict_layer_1", model.num_quantizers == 1))
  model.dtype = "float32"
  return model


def load_amphion(path: str, num_heads: int | None = None, scan_layers: bool = True,
                 model: ml_collections.ConfigDict | None = None):
  """Reads a released S2A safetensors file -> (model config, params)."""
  tensors, metadata = common.load_safetensors(path)
  if model is None:
    model = infer_model_config(tensors, metadata, num_heads)
    model.scan_layers = scan_layers
  return model, amphion_to_params(tensors, model, source=path)


def save_amphion(path: str, params: dict, model: ml_collections.ConfigDict) -> None:
  meta = {"config": json.dumps({"hidden_size": model.hidden_size, "num_layers": model.num_layers,
                                "num_heads": model.num_heads, "num_quantizer": model.num_quantizers,
                                "codebook_size": model.vocab_size,
                                "cond_codebook_size": model.cond_vocab_size,
                                "predict_layer_1": model.predicts_first_layer})}
  common.save_safetensors(path, params_to_amphion(params, model), meta)
