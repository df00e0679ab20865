"""`python -m metis_jax.train_eval`: the command; its code is metis_jax/training/evaluate.py."""

import os
import sys

from metis_jax import cli_support  # before jax: the console filters
from metis_jax.training import evaluate


def check_inputs(config, workdir: str, heldout) -> None:
  """Raises UserError for a workdir without checkpoints or a config with no held-out data to score."""
  from metis_jax.training import objectives  # pylint: disable=import-outside-toplevel
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if "://" not in workdir and not (os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
    raise cli_support.UserError(f"--workdir {workdir}: no checkpoints in {ckpt_dir}; train first "
                                f"(python -m metis_jax.train --config ... --workdir {workdir})")
  if heldout:
    if "://" not in heldout and not os.path.exists(heldout):
      raise cli_support.UserError(f"--heldout {heldout} does not exist; give a folder of tokenized shards")
    return
  kind = objectives.kind_of(config)
  if not (config.data.demo_corpus and not config.data.train_sources and kind == "s2a"):
    raise cli_support.UserError(
        f"--workdir {workdir} holds a model.kind={kind!r} run"
        f"{' on the demo corpus' if config.data.demo_corpus else ''}, which has no built-in held-out split "
        "(only S2A runs on the demo corpus have one); give --heldout <tokenized shards of held-out utterances>")


def run_main() -> None:
  """Parses the flags, checks the inputs, then runs `evaluate.main`."""
  from absl import app  # pylint: disable=import-outside-toplevel
  evaluate.define_flags()
  flags = evaluate.FLAGS

  def main(argv):
    check_inputs(flags.config, flags.workdir, flags.heldout)
    sys.exit(evaluate.main(argv))

  app.run(main)


if __name__ == "__main__":
  cli_support.run(run_main)
