"""`python -m metis_jax.train`: the command; its code is metis_jax/training/loop.py."""

from metis_jax.training import loop

if __name__ == "__main__":
  loop.run_main()
