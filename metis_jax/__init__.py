"""metis_jax: Metis, a masked generative foundation model for speech, in JAX/Flax."""

__version__ = "0.1.0"
