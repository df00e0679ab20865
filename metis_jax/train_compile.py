"""`python -m metis_jax.train_compile`: the ahead-of-time dry run (metis_jax/training/aot_compile.py)."""

import re
import sys

from metis_jax import cli_support  # before jax: the console filters
from metis_jax.training import aot_devices

DEFAULT_TOPOLOGY = "cpu-8"  # aot_compile's --topology default


def _has_topology(argv) -> bool:
  return any(a == "--topology" or a.startswith("--topology=") for a in argv)


def run_main() -> None:
  """`aot_compile.main` with a batch that does not split over the mesh reported as a user error."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from jax._src.sharding import IndivisibleError  # pylint: disable=import-outside-toplevel
  from metis_jax.training import aot_compile  # pylint: disable=import-outside-toplevel
  aot_compile.define_flags()
  flags = aot_compile.FLAGS

  def main(argv):
    try:
      sys.exit(aot_compile.main(argv))
    except IndivisibleError as e:
      parts = re.search(r"partitioned (\d+) times", str(e))
      ways = f" {parts.group(1)}" if parts else ""
      raise cli_support.UserError(
          f"train.global_batch_size={flags.config.train.global_batch_size} does not split evenly over "
          f"the{ways} batch shards (mesh data x fsdp) of --topology {flags.topology}; use a multiple "
          f"of{ways or ' that number'}, or change mesh.data/mesh.fsdp") from None

  app.run(main)


if __name__ == "__main__":
  # The fake CPU devices must be set before jax is imported (the default topology too).
  argv = sys.argv if _has_topology(sys.argv) else sys.argv + [f"--topology={DEFAULT_TOPOLOGY}"]
  aot_devices.force_cpu_devices_from_argv(argv)
  cli_support.run(run_main)
