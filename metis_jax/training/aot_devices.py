"""`--topology cpu-N` on the command line: fake CPU devices, set before jax is imported."""

import os
import re


def force_cpu_devices_from_argv(argv) -> None:
  """`--topology cpu-N` as a script: set the fake device count before jax loads."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--topology=") else (
        argv[i + 1] if arg == "--topology" and i + 1 < len(argv) else None)
    if value and re.fullmatch(r"cpu-\d+", value):
      flag = f"--xla_force_host_platform_device_count={value.split('-')[1]}"
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    if value:
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
