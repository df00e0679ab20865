"""`python -m metis_jax.train_eval`: the command; its code is metis_jax/training/evaluate.py."""

from metis_jax.training import evaluate

if __name__ == "__main__":
  evaluate.run_main()
