"""GAN discriminators for acoustic-codec training (Vocos/HiFi-GAN style).

- `PeriodDiscriminator` / multi-period (HiFi-GAN MPD): the waveform reshaped
  to `[batch, samples / p, p]` and read by 2-D convolutions (5 x 1 kernels,
  stride 3 along time), one per period (2, 3, 5, 7, 11).
- `SpectrogramDiscriminator` / multi-resolution: 2-D convolutions over the
  magnitude STFT (frames x bins) at several FFT sizes (hop fft / 4).

Each sub-discriminator returns (logits, feature maps); `CodecDiscriminator`
returns lists over all of them. Activations: leaky ReLU 0.1. Widths scale
with `channels` (32 gives HiFi-GAN's 32-128-512-1024-1024 for the MPD), capped at
`max_channels`.

Kernels carry the logical axes (..., 'conv_in', 'conv_out') and biases
('conv_out',), so the mesh rules decide their layout like every other
parameter (the default rules replicate them).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from metis_jax.parallel import sharding
from metis_jax.nn.spectral import stft_magnitude
from metis_jax.nn.conv import fast_normal

LRELU = 0.1


def _conv(features: int, kernel: tuple, name: str, **kwargs) -> nn.Conv:
  """nn.Conv with a LeCun-normal kernel (fast to compile) and logical axis names."""
  axes = (None,) * len(kernel) + ("conv_in", "conv_out")
  return nn.Conv(features, kernel, name=name, kernel_init=sharding.partitioned(fast_normal(), axes),
                 bias_init=sharding.partitioned(nn.initializers.zeros, ("conv_out",)), **kwargs)


class PeriodDiscriminator(nn.Module):
  """HiFi-GAN period discriminator; the (5 x 1) 2-D kernels run as 1-D convolutions over each
  of the p phase-columns (the same operation, and much faster on CPU)."""
  period: int
  channels: int = 32
  max_channels: int = 1024

  @nn.compact
  def __call__(self, x: jax.Array):
    """`[batch, samples]` -> (logits `[batch, p, frames]`, feature maps)."""
    b, n = x.shape
    pad = (-n) % self.period
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)], mode="reflect")
    p = self.period
    h = x.reshape(b, -1, p).transpose(0, 2, 1).reshape(b * p, -1, 1)
    c, cap = self.channels, self.max_channels
    feats = []
    for i, (ch, stride) in enumerate(((c, 3), (4 * c, 3), (16 * c, 3), (32 * c, 3), (32 * c, 1))):
      h = _conv(min(ch, cap), (5,), f"conv_{i}", strides=(stride,), padding=((2, 2),))(h)
      h = nn.leaky_relu(h, LRELU)
      feats.append(h)
    h = _conv(1, (3,), "conv_post", padding=((1, 1),))(h)
    feats.append(h)
    return h.reshape(b, p, -1), feats


class SpectrogramDiscriminator(nn.Module):
  n_fft: int
  channels: int = 32

  @nn.compact
  def __call__(self, x: jax.Array):
    """`[batch, samples]` -> (logits `[batch, frames', bins']`, feature maps)."""
    mag = stft_magnitude(x, self.n_fft, self.n_fft // 4)[..., None]  # [b, frames, bins, 1]
    h = mag
    feats = []
    for i, stride in enumerate((1, 2, 2, 2, 2)):
      h = _conv(self.channels, (3, 9), f"conv_{i}", strides=(1, stride), padding=((1, 1), (4, 4)))(h)
      h = nn.leaky_relu(h, LRELU)
      feats.append(h)
    h = _conv(self.channels, (3, 3), "conv_5", padding=((1, 1), (1, 1)))(h)
    h = nn.leaky_relu(h, LRELU)
    feats.append(h)
    h = _conv(1, (3, 3), "conv_post", padding=((1, 1), (1, 1)))(h)
    feats.append(h)
    return h[..., 0], feats


class CodecDiscriminator(nn.Module):
  """Multi-period + multi-resolution spectrogram discriminators."""
  periods: tuple = (2, 3, 5, 7, 11)
  ffts: tuple = (128, 256, 512, 1024, 2048)
  channels: int = 32
  max_channels: int = 1024

  @nn.compact
  def __call__(self, x: jax.Array):
    """`[batch, samples]` -> (list of logits, list of feature-map lists)."""
    logits, feats = [], []
    for p in self.periods:
      l, f = PeriodDiscriminator(p, self.channels, self.max_channels, name=f"mpd_{p}")(x)
      logits.append(l)
      feats.append(f)
    for n in self.ffts:
      l, f = SpectrogramDiscriminator(n, self.channels, name=f"mrd_{n}")(x)
      logits.append(l)
      feats.append(f)
    return logits, feats
