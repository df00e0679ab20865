"""`python -m metis_jax.train_compile`: the ahead-of-time dry run (metis_jax/training/aot_compile.py)."""

import sys

from metis_jax.training import aot_devices

if __name__ == "__main__":
  aot_devices.force_cpu_devices_from_argv(sys.argv)  # before jax is imported
  from metis_jax.training import aot_compile  # pylint: disable=g-import-not-at-top
  aot_compile.run_main()
