"""`python -m metis_jax.codec_train`: the same command as `python -m metis_jax.train` (training/loop.py)."""

from metis_jax import cli_support  # before jax: the console filters

if __name__ == "__main__":
  from metis_jax.training import loop  # pylint: disable=g-import-not-at-top
  cli_support.run(loop.run_main)
