"""Flax Linen building blocks of the Metis transformers."""
