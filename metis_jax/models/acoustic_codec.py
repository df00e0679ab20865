"""The acoustic codec: 24 kHz waveform <-> 12 layers of 1024-way codes at 50 Hz.

Encoder (DAC-style, about 42.5M params):
  wav `[batch, samples]` -> WNConv(1 -> 96, k7) -> 4 EncoderBlocks (channels
  x2, strides 3, 4, 5, 8; each 3 ResidualUnits with dilations 1/3/9, then
  Snake and a strided WNConv) -> Snake -> WNConv(1536 -> 256, k3)
  -> latent `[batch, frames, 256]`, frames = samples / 480.
Decoder (about 128M params):
  ResidualVQ (12 FactorizedVQ, 1024 x 8 codebooks) -> VocosBackbone(256 -> 512,
  inter 4096, 30 layers) -> ISTFTHead (n_fft 1920, hop 480, "same" padding)
  -> wav `[batch, frames * 480]`.

Snake: x + sin^2(alpha x) / (alpha + 1e-9), alpha per channel.

Lengths: `encode` crops the waveform to a multiple of the hop (N samples give
N // 480 frames; the original gives the same frames for such lengths) and
`decode` returns frames * 480 samples. A padded batch with `lengths` gives
each item exactly what it gives alone: every convolution input is re-masked,
so padding never leaks into valid frames.

Long audio: `AcousticCodecInference.encode_long` / `decode_long` run fixed-size
chunks (one compilation, bounded memory): encoder chunks carry enough context
on each side that codes equal whole-file encoding; decoder chunks overlap and
are cross-faded (raised cosine) in the middle of each overlap.
"""

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metis_jax import config_lib
from metis_jax.parallel import sharding
from metis_jax.nn import conv
from metis_jax.nn import quantizer as vq
from metis_jax.nn import vocos

SAMPLE_RATE = 24000


@dataclasses.dataclass(frozen=True)
class AcousticCodecConfig:
  """Static description; defaults are the released model."""
  # Encoder.
  encoder_dim: int = 96
  up_ratios: tuple = (3, 4, 5, 8)
  latent_dim: int = 256
  use_tanh: bool = False
  # Quantizer.
  num_quantizers: int = 12
  codebook_size: int = 1024
  codebook_dim: int = 8
  quantizer_dropout: float = 0.5
  commitment: float = 0.25
  codebook_loss_weight: float = 1.0
  # Decoder.
  vocos_dim: int = 512
  vocos_intermediate_dim: int = 4096
  vocos_num_layers: int = 30
  n_fft: int = 1920
  hop_size: int = 480
  sample_rate: int = SAMPLE_RATE
  # Numerics and layout.
  weight_norm: bool = False
  scan_layers: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "up_ratios", tuple(int(r) for r in self.up_ratios))
    if math.prod(self.up_ratios) != self.hop_size:
      raise ValueError(f"up_ratios {self.up_ratios} multiply to {math.prod(self.up_ratios)}, "
                       f"not hop_size {self.hop_size}")

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "AcousticCodecConfig":
    return config_lib.dataclass_from_config(cls, model)


KIND = "acoustic_codec"  # `config.model.kind` of an acoustic-codec run (metis_jax.codec_train)


# ----------------------------------------------------------------------------- encoder


class Snake(nn.Module):
  """x + sin^2(alpha x) / (alpha + 1e-9), alpha `[channels]` (init 1)."""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param("alpha", sharding.partitioned(nn.initializers.ones, ("conv_out",)),
                       (x.shape[-1],), self.param_dtype).astype(self.dtype)
    x = x.astype(self.dtype)
    return x + jnp.square(jnp.sin(alpha * x)) / (alpha + 1e-9)


class ResidualUnit(nn.Module):
  """x + WNConv_k1(Snake(WNConv_k7,dilated(Snake(x))))."""
  dim: int
  dilation: int
  weight_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None) -> jax.Array:
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cv = dict(weight_norm=self.weight_norm, kernel_init=conv.WN_KERNEL_INIT, **dt)
    y = Snake(name="snake1", **dt)(x)
    y = conv.Conv1d(self.dim, 7, dilation=self.dilation, padding=3 * self.dilation, name="conv1",
                    **cv)(conv.mask_time(y, valid))
    y = Snake(name="snake2", **dt)(y)
    y = conv.Conv1d(self.dim, 1, name="conv2", **cv)(y)
    return conv.mask_time(x + y, valid)


class EncoderBlock(nn.Module):
  """3 ResidualUnits (dilations 1, 3, 9) on dim/2, Snake, WNConv(dim/2 -> dim, k 2s, stride s)."""
  dim: int
  stride: int
  weight_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, lengths: jax.Array | None):
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    valid = conv.lengths_to_valid(lengths, x.shape[1])
    for j, dilation in enumerate((1, 3, 9)):
      x = ResidualUnit(self.dim // 2, dilation, self.weight_norm, name=f"res_{j}", **dt)(x, valid)
    x = Snake(name="snake", **dt)(x)
    s = self.stride
    x = conv.Conv1d(self.dim, 2 * s, stride=s, padding=math.ceil(s / 2), weight_norm=self.weight_norm,
                    kernel_init=conv.WN_KERNEL_INIT, name="down", **dt)(x)
    if lengths is not None:
      lengths = lengths // s
      x = conv.mask_time(x, conv.lengths_to_valid(lengths, x.shape[1]))
    return x, lengths


class CodecEncoder(nn.Module):
  """Waveform `[batch, samples]` -> latent `[batch, samples / hop, latent_dim]`."""
  config: AcousticCodecConfig

  @nn.compact
  def __call__(self, wav: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """wav `[batch, samples]`, lengths `[batch]` samples (multiples of the hop) -> latent."""
    c = self.config
    dt = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    x = wav[..., None].astype(dt["dtype"])
    valid = conv.lengths_to_valid(lengths, x.shape[1])
    wn = dict(weight_norm=c.weight_norm, kernel_init=conv.WN_KERNEL_INIT, **dt)
    x = conv.Conv1d(c.encoder_dim, 7, padding=3, name="conv_in", **wn)(conv.mask_time(x, valid))
    x = conv.mask_time(x, valid)
    dim = c.encoder_dim
    for i, stride in enumerate(c.up_ratios):
      dim *= 2
      x, lengths = EncoderBlock(dim, stride, c.weight_norm, name=f"blocks_{i}", **dt)(x, lengths)
    x = Snake(name="snake_out", **dt)(x)
    x = conv.Conv1d(c.latent_dim, 3, padding=1, name="conv_out", **wn)(x)
    if c.use_tanh:
      x = jnp.tanh(x)
    x = conv.mask_time(x, conv.lengths_to_valid(lengths, x.shape[1]))
    return sharding.constrain(x, sharding.BATCH_LENGTH_EMBED)


# ----------------------------------------------------------------------------- decoder


class CodecDecoder(nn.Module):
  """ResidualVQ + VocosBackbone + ISTFTHead (the original `CodecDecoder` with use_vocos)."""
  config: AcousticCodecConfig

  def setup(self):
    c = self.config
    dt = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    self.quantizer = vq.ResidualVQ(c.latent_dim, c.num_quantizers, c.codebook_size, c.codebook_dim,
                                   c.commitment, c.codebook_loss_weight, c.quantizer_dropout,
                                   weight_norm=c.weight_norm, **dt)
    self.backbone = vocos.VocosBackbone(c.vocos_dim, c.vocos_intermediate_dim, c.vocos_num_layers,
                                        c.scan_layers, **dt)
    self.head = vocos.ISTFTHead(c.n_fft, c.hop_size, **dt)

  def quantize(self, latent, valid=None, n_quantizers=None, train=False) -> vq.RVQOutput:
    return self.quantizer(latent, valid, n_quantizers, train)

  def vq2emb(self, codes: jax.Array) -> jax.Array:
    return self.quantizer.vq2emb(codes)

  def __call__(self, emb: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """`[batch, frames, latent_dim]` -> `[batch, frames * hop]` float32."""
    return self.head(self.backbone(emb, valid), valid)


@flax.struct.dataclass
class AcousticCodecOutput:
  """Training forward.

  wav: `[batch, frames * hop]` reconstruction.
  latent: `[batch, frames, latent_dim]` encoder output.
  codes: `[batch, frames, n_q]`.
  commit_loss, codebook_loss: scalars (weighted, summed over layers).
  frame_valid: `[batch, frames]` bool.
  z_e: `[n_q, batch, frames, codebook_dim]` projected latents of every RVQ
    layer (candidates for dead-code restarts).
  """
  wav: jax.Array
  latent: jax.Array
  codes: jax.Array
  commit_loss: jax.Array
  codebook_loss: jax.Array
  frame_valid: jax.Array
  z_e: jax.Array


class AcousticCodec(nn.Module):
  """Encoder + decoder; params `{'encoder': ..., 'decoder': ...}` (the two released files)."""
  config: AcousticCodecConfig

  def setup(self):
    self.encoder = CodecEncoder(self.config)
    self.decoder = CodecDecoder(self.config)

  def _crop(self, wav, lengths):
    hop = self.config.hop_size
    frames = wav.shape[-1] // hop
    wav = wav[..., :frames * hop]
    if lengths is not None:
      lengths = jnp.minimum(lengths, frames * hop) // hop * hop
    return wav, lengths, frames

  def encode_latent(self, wav: jax.Array, lengths: jax.Array | None = None):
    """wav `[batch, samples]`, lengths `[batch]` -> (latent `[batch, frames, C]`, frame_valid or None)."""
    wav, lengths, frames = self._crop(wav, lengths)
    latent = self.encoder(wav, lengths)
    valid = None if lengths is None else conv.lengths_to_valid(lengths // self.config.hop_size, frames)
    return latent, valid

  def encode(self, wav: jax.Array, lengths: jax.Array | None = None,
             n_quantizers: int | None = None) -> jax.Array:
    """wav `[batch, samples]` -> codes `[batch, samples // hop, n_q]` int32 (padding frames: 0)."""
    latent, valid = self.encode_latent(wav, lengths)
    codes = self.decoder.quantize(latent, valid, n_quantizers).codes
    return codes if valid is None else jnp.where(valid[..., None], codes, 0)

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """codes `[batch, frames, n]` (first n layers) -> `[batch, frames, latent_dim]` (vq2emb)."""
    return self.decoder.vq2emb(codes)

  def decode_embeddings(self, emb: jax.Array, frame_lengths: jax.Array | None = None) -> jax.Array:
    """`[batch, frames, latent_dim]` -> wav `[batch, frames * hop]` (zeros after each length)."""
    valid = conv.lengths_to_valid(frame_lengths, emb.shape[1])
    return self.decoder(emb, valid)

  def decode(self, codes: jax.Array, frame_lengths: jax.Array | None = None) -> jax.Array:
    """codes `[batch, frames, n]` -> wav `[batch, frames * hop]` float32."""
    return self.decode_embeddings(self.embed_codes(codes), frame_lengths)

  def __call__(self, wav: jax.Array, lengths: jax.Array | None = None, train: bool = True,
               n_quantizers: int | None = None) -> AcousticCodecOutput:
    """Reconstruction with quantizer dropout (train; needs the 'dropout' rng)."""
    latent, valid = self.encode_latent(wav, lengths)
    out = self.decoder.quantize(latent, valid, n_quantizers, train)
    rec = self.decoder(out.quantized, valid)
    if valid is None:
      valid = jnp.ones(latent.shape[:2], bool)
    return AcousticCodecOutput(rec, latent, out.codes, jnp.sum(out.commit_loss),
                               jnp.sum(out.codebook_loss), valid, out.z_e)


def init_params(model: AcousticCodec, rng: jax.Array, frames: int = 2):
  """Unboxed parameter pytree `{'encoder', 'decoder'}`."""
  wav = jnp.zeros((1, frames * model.config.hop_size), jnp.float32)
  return nn.unbox(model.init({"params": rng}, wav, train=False)["params"])


def abstract_params(model: AcousticCodec):
  """Parameter shapes without allocating."""
  return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


# ----------------------------------------------------------------------------- inference


def encoder_receptive_field(config: AcousticCodecConfig) -> int:
  """Samples on each side of a frame that can influence its latent (an upper bound)."""
  rf, rate = 3, 1  # conv_in k7
  for s in config.up_ratios:
    rf += 3 * (1 + 3 + 9) * rate  # residual units, k7 dilated
    rf += 2 * s * rate           # strided conv, k 2s
    rate *= s
  return rf + rate               # conv_out k3 at frame rate


def decoder_receptive_field(config: AcousticCodecConfig) -> int:
  """Frames on each side of a frame that can influence its samples (an upper bound)."""
  return 3 + 3 * config.vocos_num_layers + math.ceil(config.n_fft / config.hop_size)


def crossfade_ramp(length: int) -> np.ndarray:
  """0 over the first quarter, raised cosine over the middle half, 1 over the last quarter."""
  t = (np.arange(length) + 0.5) / length
  x = np.clip((t - 0.25) / 0.5, 0.0, 1.0)
  return (0.5 - 0.5 * np.cos(np.pi * x)).astype(np.float32)


class AcousticCodecInference:
  """Jitted encode/decode of a converted or trained acoustic codec, with chunking for long audio.

  Example:
    codec = AcousticCodecInference(AcousticCodecConfig(), params)
    codes = codec.encode(wav)                # [batch, N // 480, 12]
    audio = codec.decode(codes)              # [batch, frames * 480]
    codes = codec.encode_long(wav_10min)     # fixed-size chunks, same codes
    audio = codec.decode_long(codes)         # overlapping chunks, cross-faded
  """

  def __init__(self, config: AcousticCodecConfig, params):
    self.config = config
    self.model = AcousticCodec(config)
    self.params = params
    m = self.model
    self._encode = jax.jit(lambda p, w, l: m.apply({"params": p}, w, l, method=AcousticCodec.encode))
    self._decode = jax.jit(lambda p, c, l: m.apply({"params": p}, c, l, method=AcousticCodec.decode))

  @property
  def hop(self) -> int:
    return self.config.hop_size

  def encode(self, wav, lengths=None) -> jax.Array:
    """wav `[batch, samples]` (lengths `[batch]` in samples) -> codes `[batch, samples // hop, n_q]`."""
    if wav.ndim == 1:
      wav = wav[None]
    wav = wav[:, :wav.shape[-1] // self.hop * self.hop]  # before jit: one compilation per frame count
    return self._encode(self.params, jnp.asarray(wav, jnp.float32),
                        None if lengths is None else jnp.asarray(lengths, jnp.int32))

  def decode(self, codes, frame_lengths=None) -> jax.Array:
    """codes `[batch, frames, n]` -> wav `[batch, frames * hop]`."""
    codes = jnp.asarray(codes, jnp.int32)
    return self._decode(self.params, codes,
                        None if frame_lengths is None else jnp.asarray(frame_lengths, jnp.int32))

  def encode_long(self, wav, chunk_frames: int = 1500, context_frames: int | None = None) -> np.ndarray:
    """Encodes `[batch, samples]` (equal lengths) in fixed windows of chunk + 2 * context frames.

    Each window keeps its central `chunk_frames` frames; the context (default:
    the encoder's receptive field, rounded up to frames) makes them equal to
    whole-file encoding. Windows never extend past the signal, so edges see
    the same zero padding as whole-file encoding.
    """
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 1:
      wav = wav[None]
    hop = self.hop
    total = wav.shape[-1] // hop
    if context_frames is None:
      context_frames = math.ceil(encoder_receptive_field(self.config) / hop)
    window = chunk_frames + 2 * context_frames
    if total <= window:
      return np.asarray(self.encode(wav[:, :total * hop]))
    out = []
    for start in range(0, total, chunk_frames):
      w0 = min(max(start - context_frames, 0), total - window)
      codes = np.asarray(self.encode(wav[:, w0 * hop:(w0 + window) * hop]))
      n = min(chunk_frames, total - start)
      out.append(codes[:, start - w0:start - w0 + n])
    return np.concatenate(out, axis=1)

  def decode_long(self, codes, chunk_frames: int = 750, overlap_frames: int = 100) -> np.ndarray:
    """Decodes `[batch, frames, n]` codes in windows of `chunk_frames`, overlapping by at least
    `overlap_frames`, cross-faded with a raised cosine over the middle half of each overlap.

    Memory is bounded by one window. Away from the overlaps the result equals
    whole decoding; in the overlaps each window is used only where it is at
    least overlap/4 frames from its own edge.
    """
    codes = np.asarray(codes, np.int32)
    hop = self.hop
    batch, total = codes.shape[:2]
    if total <= chunk_frames:
      pad = np.zeros((batch, chunk_frames - total) + codes.shape[2:], np.int32)
      wav = self.decode(np.concatenate([codes, pad], axis=1), np.full((batch,), total))
      return np.asarray(wav)[:, :total * hop]
    if not 0 < overlap_frames < chunk_frames:
      raise ValueError(f"overlap_frames must be in (0, {chunk_frames}), got {overlap_frames}")
    step = chunk_frames - overlap_frames
    starts = list(range(0, total - chunk_frames, step)) + [total - chunk_frames]
    out = np.zeros((batch, total * hop), np.float32)
    weight = np.zeros((total * hop,), np.float32)
    for k, s in enumerate(starts):
      y = np.asarray(self.decode(codes[:, s:s + chunk_frames]))
      w = np.ones((chunk_frames * hop,), np.float32)
      if k > 0:  # fade in over the overlap with the previous window
        n = (starts[k - 1] + chunk_frames - s) * hop
        w[:n] *= crossfade_ramp(n)
      if k < len(starts) - 1:  # fade out over the overlap with the next window
        n = (s + chunk_frames - starts[k + 1]) * hop
        w[-n:] *= crossfade_ramp(n)[::-1]
      out[:, s * hop:(s + chunk_frames) * hop] += y * w
      weight[s * hop:(s + chunk_frames) * hop] += w
    return out / weight
