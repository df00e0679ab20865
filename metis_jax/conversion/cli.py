r"""Converts released Amphion weights to metis_jax parameters, and back.

Amphion -> metis_jax (an Orbax checkpoint of the params plus the model config):
  python -m metis_jax.convert --input t2s_model.safetensors --output /ckpt/maskgct_t2s

metis_jax -> Amphion key layout:
  python -m metis_jax.convert --reverse --input /ckpt/maskgct_t2s --output t2s.safetensors

Fine-tunes: the released base + LoRA + adapter files (SE / TSE / VC), the LoRA
merged into the base unless --nomerge_lora:
  python -m metis_jax.convert --input metis_base/model.safetensors \
      --lora metis_se/metis_se_lora_32.safetensors \
      --adapter metis_se/metis_se_lora_32_adapter.safetensors --output /ckpt/metis_se
A full fine-tuned checkpoint with `cond_adapter.*` keys (L2S) converts with
--input alone. With --reverse, --lora and --adapter name the LoRA and adapter
files to write beside the base (--output); a model with an adapter and no
unmerged LoRA is written as one full checkpoint without them.

The model config (width, depth, vocabulary, phones) is read from the file's
shapes; heads come from `--num_heads` (default: the file's metadata, else 16).
A file that does not match is refused with its missing, unexpected and
mis-shaped keys.
"""

import json
import os
import sys

from absl import app, flags
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from metis_jax.conversion import common, finetune, released, t2s

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Amphion .safetensors file (or, with --reverse, a converted folder).")
flags.DEFINE_string("output", None, "Output folder (or, with --reverse, a .safetensors file).")
flags.DEFINE_bool("reverse", False, "Convert a metis_jax folder back to the Amphion layout.")
flags.DEFINE_integer("num_heads", None, "Attention heads (not recoverable from shapes; default 16).")
flags.DEFINE_bool("scan_layers", True, "Store the blocks stacked (nn.scan layout).")
flags.DEFINE_string("lora", None, "Released LoRA .safetensors of a Metis fine-tune (with --reverse: "
                    "the LoRA file to write).")
flags.DEFINE_string("adapter", None, "Released adapter .safetensors of a Metis fine-tune (with "
                    "--reverse: the adapter file to write).")
flags.DEFINE_bool("merge_lora", True, "Fold the LoRA into the base weights (W + alpha/r B A).")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: the file's metadata, else 2 x rank).")
flags.DEFINE_string("released_dir", None, "Folder of the released weights as downloaded (python -m "
                    "metis_jax.fetch); with --part, the files to convert come from it.")
flags.DEFINE_enum("part", None, list(released.STAGE1_PARTS), "Released stage-1 model to convert from "
                  "--released_dir (the S2A models and codecs are read by decode as released).")

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_converted(directory: str, model: ml_collections.ConfigDict, params) -> None:
  """Writes `<dir>/model_config.json` and an Orbax checkpoint `<dir>/params`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
    json.dump(model.to_dict(), f, indent=1, sort_keys=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
  checkpointer.wait_until_finished()


def load_converted(directory: str):
  """Reads a folder written by `save_converted` -> (model config, params as numpy)."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, MODEL_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{directory}: no {MODEL_CONFIG_FILE}; not a converted metis_jax model")
  model = ml_collections.ConfigDict(common.read_model_config(config_path))
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR))
  return model, jax.tree_util.tree_map(np.asarray, params)


def main(argv):
  del argv
  if FLAGS.released_dir:
    if FLAGS.reverse or FLAGS.input or not FLAGS.part:
      raise app.UsageError("--released_dir needs --part (one of "
                           f"{', '.join(released.STAGE1_PARTS)}) and no --input or --reverse")
    try:
      files = released.stage1_files(FLAGS.released_dir, FLAGS.part)
    except (FileNotFoundError, ValueError) as e:
      print(str(e), file=sys.stderr)
      sys.exit(2)
    FLAGS.input = files["input"]
    FLAGS.lora, FLAGS.adapter = FLAGS.lora or files["lora"], FLAGS.adapter or files["adapter"]
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError("--input and --output are required")
  try:
    if FLAGS.reverse:
      model, params = load_converted(FLAGS.input)
      if FLAGS.lora or FLAGS.adapter:
        finetune.save_released(FLAGS.output, params, model, FLAGS.lora, FLAGS.adapter)
        print(f"wrote {', '.join(p for p in (FLAGS.output, FLAGS.lora, FLAGS.adapter) if p)}")
      elif model.get("cond_feature_dim") or model.get("lora_rank"):
        finetune.save_full(FLAGS.output, params, model)
        print(f"wrote {FLAGS.output} (full fine-tuned checkpoint)")
      else:
        t2s.save_amphion(FLAGS.output, params, model)
        print(f"wrote {FLAGS.output} ({len(t2s.key_map(model))} tensors)")
    else:
      if FLAGS.lora or FLAGS.adapter:
        model, params = finetune.load_released(
            FLAGS.input, FLAGS.lora, FLAGS.adapter, merge=FLAGS.merge_lora,
            lora_alpha=FLAGS.lora_alpha, num_heads=FLAGS.num_heads, scan_layers=FLAGS.scan_layers)
      elif finetune.has_adapter_keys(FLAGS.input):
        model, params = finetune.load_full(FLAGS.input, num_heads=FLAGS.num_heads,
                                           scan_layers=FLAGS.scan_layers)
      else:
        model, params = t2s.load_amphion(FLAGS.input, FLAGS.num_heads, FLAGS.scan_layers)
      save_converted(FLAGS.output, model, params)
      n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
      print(f"wrote {FLAGS.output}: {model.num_layers} layers x {model.hidden_size} wide, "
            f"{model.num_heads} heads, vocab {model.vocab_size}, phones {model.use_phone_cond}, "
            f"{n / 1e6:.1f}M parameters"
            + (f", adapter c={model.cond_feature_dim}" if model.get("cond_feature_dim") else "")
            + (f", LoRA r={model.lora_rank} unmerged" if model.get("lora_rank") else ""))
  except common.ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)



def run_main() -> None:
  """`python -m metis_jax.convert`."""
  app.run(main)
