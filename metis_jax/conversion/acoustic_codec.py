"""Amphion acoustic codec safetensors (two files) <-> AcousticCodec parameters.

Encoder file (`acoustic_codec/model.safetensors`), nn.Sequential indices:
  block.0                      WNConv(1 -> d, k7)                -> encoder/conv_in
  block.{b}.block.{j}.block.0  Snake alpha [1, C, 1]  (b 1..4, j 0..2)
                                                                  -> encoder/blocks_{b-1}/res_{j}/snake1
  block.{b}.block.{j}.block.1  WNConv k7 dilated                  -> .../res_{j}/conv1
  block.{b}.block.{j}.block.2  Snake                              -> .../res_{j}/snake2
  block.{b}.block.{j}.block.3  WNConv k1                          -> .../res_{j}/conv2
  block.{b}.block.3            Snake                              -> encoder/blocks_{b-1}/snake
  block.{b}.block.4            WNConv(C -> 2C, k 2s, stride s)    -> encoder/blocks_{b-1}/down
  block.5                      Snake                              -> encoder/snake_out
  block.6                      WNConv(16d -> latent, k3)          -> encoder/conv_out
Decoder file (`acoustic_codec/model_1.safetensors`):
  quantizer.quantizers.{q}.{in_project,out_project,codebook}.*   -> decoder/quantizer/layers_{q}/...
  model.backbone.*   (VocosBackbone, as in the semantic codec)    -> decoder/backbone/...
  model.head.out.{weight [n_fft + 2, dim], bias}                  -> decoder/head/out
  model.head.istft.window [n_fft]  a buffer: must be the periodic Hann window (checked, not stored)

Weight-normed convolutions are folded (see conversion/semantic_codec.py).
"""

import dataclasses
import json
import math

import jax
import numpy as np

from metis_jax.models import acoustic_codec
from metis_jax.conversion import common
from metis_jax.conversion import semantic_codec as sc_conv
from metis_jax.nn import vocos

WINDOW_KEY = "model.head.istft.window"
_BACKBONES = [("decoder", "backbone")]


def encoder_key_map(config: acoustic_codec.AcousticCodecConfig) -> list:
  e = sc_conv.wn_conv_entries("block.0", ("encoder", "conv_in"))
  for b in range(len(config.up_ratios)):
    p, o = f"block.{b + 1}.block", ("encoder", f"blocks_{b}")
    for j in range(3):
      r, q = f"{p}.{j}.block", o + (f"res_{j}",)
      e.append((f"{r}.0.alpha", q + ("snake1", "alpha"), "snake"))
      e += sc_conv.wn_conv_entries(f"{r}.1", q + ("conv1",))
      e.append((f"{r}.2.alpha", q + ("snake2", "alpha"), "snake"))
      e += sc_conv.wn_conv_entries(f"{r}.3", q + ("conv2",))
    e.append((f"{p}.3.alpha", o + ("snake", "alpha"), "snake"))
    e += sc_conv.wn_conv_entries(f"{p}.4", o + ("down",))
  n = len(config.up_ratios)
  e.append((f"block.{n + 1}.alpha", ("encoder", "snake_out", "alpha"), "snake"))
  e += sc_conv.wn_conv_entries(f"block.{n + 2}", ("encoder", "conv_out"))
  return e


def decoder_key_map(config: acoustic_codec.AcousticCodecConfig) -> list:
  e = sc_conv.rvq_entries("quantizer", ("decoder", "quantizer"), config.num_quantizers)
  e += sc_conv.vocos_entries("model.backbone", ("decoder", "backbone"), config.vocos_num_layers)
  e += [("model.head.out.weight", ("decoder", "head", "out", "kernel"), "linear"),
        ("model.head.out.bias", ("decoder", "head", "out", "bias"), "same")]
  return e


def _unscanned_shapes(config):
  flat = dataclasses.replace(config, scan_layers=False)
  return acoustic_codec.abstract_params(acoustic_codec.AcousticCodec(flat))


def expected_shapes(config: acoustic_codec.AcousticCodecConfig) -> tuple[dict, dict]:
  """(encoder file shapes, decoder file shapes) for a model config."""
  shapes = _unscanned_shapes(config)
  dec = sc_conv.file_shapes(decoder_key_map(config), shapes)
  dec[WINDOW_KEY] = (config.n_fft,)
  return sc_conv.file_shapes(encoder_key_map(config), shapes), dec


def _check_window(source: str, window: np.ndarray, n_fft: int) -> None:
  expected = vocos.hann_window(n_fft)
  if not np.allclose(window, expected, atol=1e-6):
    raise common.ConversionError(
        f"{source}: {WINDOW_KEY} is not the periodic Hann window of {n_fft} samples "
        f"(max difference {np.max(np.abs(window - expected)):.3g}); this model computes that window")


def amphion_to_params(encoder_tensors: dict | None, decoder_tensors: dict | None,
                      config: acoustic_codec.AcousticCodecConfig,
                      sources: tuple[str, str] = ("encoder state dict", "decoder state dict")) -> dict:
  """Strictly converts the released state dicts into `{'encoder', 'decoder'}` params.

  Either file may be None (then that half is absent from the result).
  """
  enc_shapes, dec_shapes = expected_shapes(config)
  params = {}
  if encoder_tensors is not None:
    common.check_keys(sources[0], encoder_tensors, enc_shapes)
    params.update(sc_conv.to_ours(encoder_key_map(config), encoder_tensors, config.weight_norm))
  if decoder_tensors is not None:
    common.check_keys(sources[1], decoder_tensors, dec_shapes)
    _check_window(sources[1], np.asarray(decoder_tensors[WINDOW_KEY]), config.n_fft)
    params.update(sc_conv.to_ours(decoder_key_map(config), decoder_tensors, config.weight_norm))
    if config.scan_layers:
      params = sc_conv.rescan(params, _BACKBONES, config.vocos_num_layers)
  dtype = np.dtype(config.param_dtype)
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def params_to_amphion(params: dict, config: acoustic_codec.AcousticCodecConfig) -> tuple[dict, dict]:
  """AcousticCodec params -> (encoder state dict, decoder state dict), float32 numpy."""
  out_enc = out_dec = None
  if "encoder" in params:
    out_enc = sc_conv.to_file(encoder_key_map(config), params)
  if "decoder" in params:
    out_dec = sc_conv.to_file(decoder_key_map(config), sc_conv.unscan(params, _BACKBONES))
    out_dec[WINDOW_KEY] = vocos.hann_window(config.n_fft)
  return out_enc, out_dec


def infer_config(encoder_tensors: dict | None, decoder_tensors: dict | None,
                 metadata: dict | None = None, **overrides) -> acoustic_codec.AcousticCodecConfig:
  """Model config from the files' shapes (hop and rate from the metadata or the released values)."""
  kw = {}
  meta = common.parse_config_metadata(metadata or {}, "the acoustic codec file")
  if encoder_tensors is not None:
    if "block.0.weight_v" not in encoder_tensors:
      raise common.ConversionError("not an Amphion codec encoder file: no `block.0.weight_v`")
    kw["encoder_dim"] = int(encoder_tensors["block.0.weight_v"].shape[0])
    ratios, b = [], 1
    while f"block.{b}.block.4.weight_v" in encoder_tensors:
      ratios.append(int(encoder_tensors[f"block.{b}.block.4.weight_v"].shape[-1]) // 2)
      b += 1
    kw["up_ratios"] = tuple(ratios)
    kw["latent_dim"] = int(encoder_tensors[f"block.{b + 1}.weight_v"].shape[0])
  if decoder_tensors is not None:
    if "model.head.out.weight" not in decoder_tensors:
      raise common.ConversionError("not an Amphion codec decoder file: no `model.head.out.weight`")
    q = {int(k.split(".")[2]) for k in decoder_tensors if k.startswith("quantizer.quantizers.")}
    cb = decoder_tensors["quantizer.quantizers.0.codebook.weight"]
    layers = {int(k.split(".")[3]) for k in decoder_tensors if k.startswith("model.backbone.convnext.")}
    kw.update(num_quantizers=max(q) + 1, codebook_size=int(cb.shape[0]), codebook_dim=int(cb.shape[1]),
              latent_dim=int(decoder_tensors["quantizer.quantizers.0.in_project.weight_v"].shape[1]),
              vocos_dim=int(decoder_tensors["model.backbone.embed.weight"].shape[0]),
              vocos_intermediate_dim=int(decoder_tensors["model.backbone.convnext.0.pwconv1.weight"].shape[0]),
              vocos_num_layers=max(layers) + 1,
              n_fft=int(decoder_tensors["model.head.out.weight"].shape[0]) - 2)
    kw["hop_size"] = int(meta.get("hop_size", 480))
  if "up_ratios" in kw:
    kw["hop_size"] = math.prod(kw["up_ratios"])
  elif "hop_size" in kw and kw["hop_size"] != 480:
    raise common.ConversionError("a decoder-only file with a non-default hop needs the encoder's up_ratios")
  kw.update(overrides)
  return acoustic_codec.AcousticCodecConfig(**kw)


def load_amphion(encoder_path: str | None, decoder_path: str | None,
                 config: acoustic_codec.AcousticCodecConfig | None = None, **overrides):
  """Reads the released encoder and decoder files -> (config, params)."""
  enc = dec = None
  metadata = {}
  if encoder_path:
    enc, _ = common.load_safetensors(encoder_path)
  if decoder_path:
    dec, metadata = common.load_safetensors(decoder_path)
  if config is None:
    config = infer_config(enc, dec, metadata, **overrides)
  return config, amphion_to_params(enc, dec, config, (str(encoder_path), str(decoder_path)))


def save_amphion(encoder_path: str | None, decoder_path: str | None, params: dict,
                 config: acoustic_codec.AcousticCodecConfig) -> None:
  enc, dec = params_to_amphion(params, config)
  if encoder_path and enc is not None:
    common.save_safetensors(encoder_path, enc, {"config": json.dumps(
        {"d_model": config.encoder_dim, "up_ratios": list(config.up_ratios),
         "out_channels": config.latent_dim, "use_tanh": config.use_tanh})})
  if decoder_path and dec is not None:
    common.save_safetensors(decoder_path, dec, {"config": json.dumps(
        {"in_channels": config.latent_dim, "num_quantizers": config.num_quantizers,
         "codebook_size": config.codebook_size, "codebook_dim": config.codebook_dim,
         "vocos_dim": config.vocos_dim, "vocos_intermediate_dim": config.vocos_intermediate_dim,
         "vocos_num_layers": config.vocos_num_layers, "n_fft": config.n_fft,
         "hop_size": config.hop_size, "padding": "same", "quantizer_type": "fvq",
         "use_vocos": True, "use_l2_normlize": True})})
