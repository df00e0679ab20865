"""Loading the models of the generation pipeline from the files a user has.

Stage-1 (T2S / Metis) and S2A models come from any of:
  * a released Amphion `.safetensors` file (converted on the fly: config from
    the shapes, heads from the metadata or 16);
  * a folder written by `python -m metis_jax.convert` (`model_config.json` +
    Orbax `params/`);
  * a training workdir (`config.json` + `checkpoints/<step>/state`): the
    newest step's parameters;
  * fine-tunes (SE / TSE / VC): the released base file + LoRA + adapter
    files, merged once at load; L2S / Omni: one full checkpoint whose
    `cond_adapter` keys mark it (`conversion.finetune`).
The acoustic codec from its two safetensors files (Amphion's
`acoustic_codec/model.safetensors` + `model_1.safetensors`, or what
`metis_jax.codec_train` writes, `encoder.safetensors` + `decoder.safetensors`),
given as two paths or as the folder holding them. The SSL tokenizer from a
saved tokenizer folder (`tokenizer.json`: k-means, or w2v-BERT + semantic
codec). Every failure names the path and what is wrong with it.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from metis_jax.models import metis, s2a


class ModelFileError(ValueError):
  """A model path that does not hold what it should (the message names it)."""


@dataclasses.dataclass
class LoadedModel:
  """A model config (`config.model` layout), its module and numpy parameters."""
  config: ml_collections.ConfigDict
  module: Any
  params: Any
  source: str


def _latest_checkpoint(workdir: str) -> Optional[str]:
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return None
  steps = [int(d) for d in os.listdir(root) if d.isdigit() and
           os.path.isdir(os.path.join(root, d, "state"))]
  return os.path.join(root, str(max(steps)), "state") if steps else None


def _read_params(path: str, kind: str):
  """-> (model ConfigDict, params) for kind 'metis' or 's2a'."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such model file or folder")
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise ModelFileError(f"{path}: expected a .safetensors file or a model folder")
    from metis_jax.conversion import common  # pylint: disable=g-import-not-at-top
    conv = _converter(kind)
    try:
      return conv.load_amphion(path)
    except common.ConversionError as e:
      raise ModelFileError(f"{path}: {e}") from e
  if os.path.exists(os.path.join(path, "model_config.json")):
    from metis_jax.conversion import cli as convert  # pylint: disable=g-import-not-at-top
    return convert.load_converted(path)
  state = _latest_checkpoint(path)
  if state is not None and os.path.exists(os.path.join(path, "config.json")):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with open(os.path.join(path, "config.json")) as f:
      model = ml_collections.ConfigDict(json.load(f)["model"])
    restored = ocp.StandardCheckpointer().restore(state)
    params = restored["params"] if isinstance(restored, dict) and "params" in restored else None
    if params is None:
      raise ModelFileError(f"{state}: no 'params' in the checkpoint")
    import jax  # pylint: disable=g-import-not-at-top
    return model, jax.tree_util.tree_map(np.asarray, params)
  raise ModelFileError(f"{path}: not a model folder (no model_config.json from metis_jax.convert, "
                       "nor config.json + checkpoints/<step>/state from training)")


def _converter(kind: str):
  if kind == "s2a":
    from metis_jax.conversion import s2a as conv  # pylint: disable=g-import-not-at-top
  else:
    from metis_jax.conversion import t2s as conv  # pylint: disable=g-import-not-at-top
  return conv


def _set_dtype(model: ml_collections.ConfigDict, dtype: Optional[str]) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(model.to_dict())
  if dtype:
    model.dtype = dtype
  return model


def _has_adapter_keys(path: str) -> bool:
  """Whether a safetensors file holds a condition adapter (a full fine-tuned checkpoint)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="numpy") as f:
      return any(k.split(".")[0] == "cond_adapter" or k.startswith("model.cond_adapter.")
                 for k in f.keys())
  except Exception as e:  # pylint: disable=broad-except
    raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from e


def _finetune_module(path: str):
  try:
    from metis_jax.conversion import finetune  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ModelFileError(f"{path}: fine-tuned files need metis_jax.conversion.finetune ({e})") from e
  return finetune


def _read_finetune(path: str, lora: Optional[str], adapter: Optional[str], lora_alpha: Optional[float]):
  """-> (model config, params) of a fine-tune: base + LoRA + adapter files (merged), or one full
  checkpoint with its adapter; None when `path` is neither (an ordinary stage-1 model)."""
  if lora or adapter:
    for flag, p in (("--model", path), ("--lora", lora), ("--adapter", adapter)):
      if p and not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: no such file ({flag})")
    if not path.endswith(".safetensors"):
      raise ModelFileError(f"{path}: --lora / --adapter apply to the released base .safetensors file")
    finetune = _finetune_module(path)
    try:
      return finetune.load_released(path, lora_path=lora, adapter_path=adapter, merge=True,
                                    lora_alpha=lora_alpha)
    except ValueError as e:
      raise ModelFileError(f"{path} + {lora} + {adapter}: {e}") from e
  if os.path.isfile(path) and path.endswith(".safetensors") and _has_adapter_keys(path):
    finetune = _finetune_module(path)
    try:
      return finetune.load_full(path)
    except ValueError as e:
      raise ModelFileError(f"{path}: {e}") from e
  return None


def load_stage1(path: str, dtype: Optional[str] = None, *, lora: Optional[str] = None,
                adapter: Optional[str] = None, lora_alpha: Optional[float] = None) -> LoadedModel:
  """The stage-1 model (T2S / Metis) at `path`; `dtype` overrides the compute dtype.

  Fine-tunes: `path` the released Metis base file with `lora` and / or
  `adapter` (the LoRA is merged once here, W + (alpha / r) B A), or a full
  fine-tuned checkpoint (L2S, Omni: its adapter keys say so), or a
  converted folder / workdir whose config has `cond_feature_dim`.
  """
  loaded = _read_finetune(os.path.abspath(os.path.expanduser(path)), lora, adapter, lora_alpha)
  model, params = loaded if loaded is not None else _read_params(path, "metis")
  if model.get("kind", "metis") != "metis":
    raise ModelFileError(f"{path}: a {model.kind!r} model, not a stage-1 (T2S/Metis) model")
  model = _set_dtype(model, dtype)
  module = metis.MetisModel(metis.MetisConfig.from_config(model))
  return LoadedModel(model, module, params, path)


def load_s2a(path: str, dtype: Optional[str] = None) -> LoadedModel:
  """An S2A model (1-layer or full) at `path`."""
  model, params = _read_params(path, "s2a")
  if model.get("kind", "s2a") != "s2a":
    raise ModelFileError(f"{path}: a {model.kind!r} model, not an S2A model")
  model = _set_dtype(model, dtype)
  module = s2a.S2AModel(s2a.S2AConfig.from_config(model))
  return LoadedModel(model, module, params, path)


CODEC_FILE_PAIRS = (("encoder.safetensors", "decoder.safetensors"),
                    ("model.safetensors", "model_1.safetensors"))


def codec_paths(encoder: str, decoder: Optional[str] = None) -> tuple[str, str]:
  """Resolves the codec files: two paths, or one folder holding a known pair."""
  if decoder:
    for p in (encoder, decoder):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{p}: acoustic codec file not found")
    return encoder, decoder
  if os.path.isdir(encoder):
    for enc, dec in CODEC_FILE_PAIRS:
      e, d = os.path.join(encoder, enc), os.path.join(encoder, dec)
      if os.path.isfile(e) and os.path.isfile(d):
        return e, d
    raise ModelFileError(f"{encoder}: no codec files in the folder (expected one of "
                         f"{', '.join('+'.join(p) for p in CODEC_FILE_PAIRS)})")
  raise FileNotFoundError(f"{encoder}: acoustic codec folder not found (or give both "
                          "--codec_encoder and --codec_decoder files)")


def load_codec(encoder: str, decoder: Optional[str] = None, dtype: Optional[str] = None):
  """`acoustic_codec.AcousticCodecInference` from the encoder and decoder files."""
  from metis_jax.models import acoustic_codec  # pylint: disable=g-import-not-at-top
  from metis_jax.conversion import acoustic_codec as conv  # pylint: disable=g-import-not-at-top
  from metis_jax.conversion import common  # pylint: disable=g-import-not-at-top
  enc, dec = codec_paths(encoder, decoder)
  try:
    # Per-layer decoder weights, not stacked for a scan: no per-call copy of each layer
    # out of the stack (decode 8% faster on CPU; same outputs).
    config, params = conv.load_amphion(enc, dec, scan_layers=False)
  except common.ConversionError as e:
    raise ModelFileError(f"{enc} / {dec}: {e}") from e
  if dtype:
    config = dataclasses.replace(config, dtype=dtype)
  return acoustic_codec.AcousticCodecInference(config, params)


def load_tokenizer(path: str):
  """A saved SSL tokenizer (k-means or w2v-BERT + semantic codec)."""
  from metis_jax.frontend import tokenizers  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: SSL tokenizer folder not found")
  return tokenizers.load_tokenizer(path)
