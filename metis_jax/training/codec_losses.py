"""GAN losses for codec training: least-squares GAN and feature matching over a list of
sub-discriminator outputs. The reconstruction loss is `nn.spectral.multiscale_mel_loss`."""

import jax
import jax.numpy as jnp


def lsgan_discriminator_loss(real_logits, fake_logits) -> jax.Array:
  """sum_k mean (1 - D_k(real))^2 + mean D_k(fake)^2."""
  return sum(jnp.mean(jnp.square(1.0 - r)) + jnp.mean(jnp.square(f)) for r, f in zip(real_logits, fake_logits))


def lsgan_generator_loss(fake_logits) -> jax.Array:
  """sum_k mean (1 - D_k(fake))^2."""
  return sum(jnp.mean(jnp.square(1.0 - f)) for f in fake_logits)


def feature_matching_loss(real_features, fake_features) -> jax.Array:
  """sum_k mean_l mean |F_kl(real) - F_kl(fake)|, real features not differentiated."""
  total = 0.0
  for rs, fs in zip(real_features, fake_features):
    total = total + sum(jnp.mean(jnp.abs(jax.lax.stop_gradient(r) - f)) for r, f in zip(rs, fs)) / len(rs)
  return total
