"""Conversion between released Amphion safetensors and metis_jax parameters."""
