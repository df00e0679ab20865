"""What a fine-tune writes at the end: a folder `decode` reads, and the released file layout.

  <out>/model/              `model_config.json` + Orbax `params/` (`conversion.cli.save_converted`),
                            the LoRA merged (W + alpha/r A B): decode at the base model's cost,
                            `python -m metis_jax.decode --task se --model <out>/model ...`
  <out>/base.safetensors    the released three-file layout (`conversion.finetune.save_released`)
  <out>/lora.safetensors    for LoRA and/or gated-adapter fine-tunes: Amphion keys, read back by
  <out>/adapter.safetensors `decode --model base.safetensors --lora ... --adapter ...`
  <out>/model.safetensors   full fine-tunes and ungated adapters (`save_full`, as the released L2S)
"""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from metis_jax.models import metis
from metis_jax.nn import lora as lora_lib


def decode_model_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fine-tuned model's config as decode reads it: kind 'metis', the LoRA merged (rank 0)."""
  out = ml_collections.ConfigDict(model.to_dict())
  out.kind = "metis"
  out.lora_rank, out.lora_alpha, out.lora_dropout = 0, 0.0, 0.0
  return out


def export(params: dict, model: ml_collections.ConfigDict, out_dir: str, full: bool = False) -> list[str]:
  """Writes the exports of one fine-tune (module doc) from its numpy parameters; returns the paths.

  Args:
    params: the whole fine-tuned model (base + trained), LoRA unmerged.
    model: its `config.model`.
    out_dir: folder to write into.
    full: the base itself was trained (`finetune.trainable` touches base weights): one
      full checkpoint instead of base + LoRA + adapter.
  """
  from metis_jax.conversion import cli as convert  # pylint: disable=import-outside-toplevel
  from metis_jax.conversion import common, finetune  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  cfg = metis.MetisConfig.from_config(model)
  has_lora = lora_lib.has_lora(params)
  merged = jax.tree_util.tree_map(np.asarray, lora_lib.merge_lora(params, cfg.lora)) if has_lora else params
  written = []
  folder = os.path.join(out_dir, "model")
  convert.save_converted(folder, decode_model_config(model), merged)
  written.append(folder)
  released = ml_collections.ConfigDict(model.to_dict())
  released.kind = "metis"
  has_adapter = "adapter" in params
  try:
    if not full and (has_lora or has_adapter) and (not has_adapter or model.adapter_gated):
      base_path = os.path.join(out_dir, "base.safetensors")
      lora_path = os.path.join(out_dir, "lora.safetensors") if has_lora else None
      adapter_path = os.path.join(out_dir, "adapter.safetensors") if has_adapter else None
      finetune.save_released(base_path, params, released, lora_path, adapter_path)
      written += [p for p in (base_path, lora_path, adapter_path) if p]
    else:
      path = os.path.join(out_dir, "model.safetensors")
      finetune.save_full(path, merged, decode_model_config(model))
      written.append(path)
  except common.ConversionError as e:
    logging.warning("the released safetensors layout was not written: %s", e)
  return written
