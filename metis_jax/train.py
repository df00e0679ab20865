"""`python -m metis_jax.train`: the command; its code is metis_jax/training/loop.py (every kind of run)."""

from metis_jax import cli_support  # before jax: the console filters

if __name__ == "__main__":
  from metis_jax.training import loop  # pylint: disable=g-import-not-at-top
  cli_support.run(loop.run_main)
