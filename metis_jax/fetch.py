"""`python -m metis_jax.fetch --released_dir DIR`: downloads the released weights (see
`metis_jax.conversion.fetch_released`)."""

from metis_jax.conversion.fetch_released import run_main

if __name__ == "__main__":
  run_main()
