"""`python -m metis_jax.decode`: the command; its code is metis_jax/inference/cli.py."""

from metis_jax import cli_support  # before jax: the console filters
from metis_jax.inference import cli

if __name__ == "__main__":
  cli_support.run(cli.run_main)
