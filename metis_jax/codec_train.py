"""`python -m metis_jax.codec_train`: the command; its code is metis_jax/training/codec_loop.py."""

from metis_jax.training import codec_loop

if __name__ == "__main__":
  codec_loop.run_main()
