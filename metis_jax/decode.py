"""`python -m metis_jax.decode`: the command; its code is metis_jax/inference/cli.py."""

from metis_jax.inference import cli

if __name__ == "__main__":
  cli.run_main()
