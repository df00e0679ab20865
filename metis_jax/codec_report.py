"""`python -m metis_jax.codec_report`: the command; its code is metis_jax/inference/codec_report.py."""

from metis_jax import cli_support  # before jax: the console filters
from metis_jax.inference import codec_report

if __name__ == "__main__":
  cli_support.run(codec_report.run_main)
