"""`python -m metis_jax.convert`: the command; its code is metis_jax/conversion/cli.py."""

from metis_jax.conversion import cli

if __name__ == "__main__":
  cli.run_main()
