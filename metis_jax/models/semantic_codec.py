"""The semantic codec (RepCodec-style): w2v-BERT features <-> 8192 SSL tokens.

feat `[batch, time, 1024]` (normalized w2v-BERT layer-17 features, 50 Hz)
  -> encoder (VocosBackbone 1024 -> 384, Linear 384 -> 1024)
  -> ResidualVQ with one FactorizedVQ (8192 x 8, cosine search)
  -> codes `[batch, time]` and quantized embeddings `[batch, time, 1024]`
  -> decoder (same structure as the encoder) -> reconstructed features.

The tokens Metis models are `quantize(feat)[0]`. The decoder only matters for
training the codec (reconstruction loss).

Usage:
  model = SemanticCodec(SemanticCodecConfig())
  codes, emb = model.apply({'params': params}, feat, method=SemanticCodec.quantize)
"""

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from metis_jax import config_lib
from metis_jax.parallel import sharding
from metis_jax.nn import quantizer as vq
from metis_jax.nn import vocos


@dataclasses.dataclass(frozen=True)
class SemanticCodecConfig:
  """Static description; defaults are the released model (about 44.3M params)."""
  codebook_size: int = 8192
  hidden_size: int = 1024
  codebook_dim: int = 8
  vocos_dim: int = 384
  vocos_intermediate_dim: int = 2048
  vocos_num_layers: int = 12
  num_quantizers: int = 1
  commitment: float = 0.15
  codebook_loss_weight: float = 1.0
  weight_norm: bool = False
  scan_layers: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "SemanticCodecConfig":
    return config_lib.dataclass_from_config(cls, model)


KIND = "semantic_codec"  # `config.model.kind` of a semantic-codec run (metis_jax.codec_train)


class VocosProjection(nn.Module):
  """VocosBackbone(in -> dim) followed by Linear(dim -> out): one `nn.Sequential` of the original."""
  dim: int
  intermediate_dim: int
  num_layers: int
  out_dim: int
  scan_layers: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """`[batch, time, in]` -> `[batch, time, out_dim]`."""
    h = vocos.VocosBackbone(self.dim, self.intermediate_dim, self.num_layers, self.scan_layers,
                            self.dtype, self.param_dtype, name="backbone")(x, valid)
    y = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=sharding.partitioned(vocos.DENSE_INIT, ("embed", "conv_out")),
                 bias_init=sharding.partitioned(nn.initializers.zeros, ("conv_out",)), name="out")(h)
    return sharding.constrain(y, sharding.BATCH_LENGTH_EMBED)


@flax.struct.dataclass
class SemanticCodecOutput:
  """Training forward.

  reconstruction: `[batch, time, hidden]` decoder output.
  codes: `[batch, time, n_q]`.
  commit_loss, codebook_loss: scalars (weighted, summed over layers).
  vq: the quantizer's full output (z_e for dead-code restarts).
  """
  reconstruction: jax.Array
  codes: jax.Array
  commit_loss: jax.Array
  codebook_loss: jax.Array
  vq: vq.RVQOutput


class SemanticCodec(nn.Module):
  """RepCodec: encoder, factorized VQ, decoder (all at the feature frame rate)."""
  config: SemanticCodecConfig

  def setup(self):
    c = self.config
    dt = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    self.encoder = VocosProjection(c.vocos_dim, c.vocos_intermediate_dim, c.vocos_num_layers,
                                   c.hidden_size, c.scan_layers, **dt)
    self.decoder = VocosProjection(c.vocos_dim, c.vocos_intermediate_dim, c.vocos_num_layers,
                                   c.hidden_size, c.scan_layers, **dt)
    self.quantizer = vq.ResidualVQ(c.hidden_size, c.num_quantizers, c.codebook_size, c.codebook_dim,
                                   c.commitment, c.codebook_loss_weight, quantizer_dropout=0.0,
                                   weight_norm=c.weight_norm, **dt)

  def encode(self, feat: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """`[batch, time, hidden]` features -> `[batch, time, hidden]` latents (before the VQ)."""
    return self.encoder(feat, valid)

  def quantize(self, feat: jax.Array, valid: jax.Array | None = None):
    """Features -> (codes, quantized embeddings).

    Args:
      feat: `[batch, time, hidden]`.
      valid: optional `[batch, time]` bool (padding does not leak into valid frames).

    Returns:
      codes `[batch, time]` int32 (`[batch, time, n_q]` if n_q > 1) and the
      quantized embedding `[batch, time, hidden]` (the VQ output, not the decoder's).
    """
    out = self.quantizer(self.encoder(feat, valid), valid)
    codes = out.codes[..., 0] if self.config.num_quantizers == 1 else out.codes
    return codes, out.quantized

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """`[batch, time]` (or `[batch, time, n_q]`) codes -> `[batch, time, hidden]` (vq2emb)."""
    if codes.ndim == 2:
      codes = codes[..., None]
    return self.quantizer.vq2emb(codes)

  def decode(self, emb: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """`[batch, time, hidden]` quantized embeddings -> `[batch, time, hidden]` features."""
    return self.decoder(emb, valid)

  def __call__(self, feat: jax.Array, valid: jax.Array | None = None) -> SemanticCodecOutput:
    """Training forward: reconstruction, VQ losses and codes (the original's `forward`)."""
    out = self.quantizer(self.encoder(feat, valid), valid, train=True)
    rec = self.decoder(out.quantized, valid)
    return SemanticCodecOutput(rec, out.codes, jnp.sum(out.commit_loss), jnp.sum(out.codebook_loss), out)


def init_params(model: SemanticCodec, rng: jax.Array, length: int = 8):
  """Unboxed parameter pytree."""
  feat = jnp.zeros((1, length, model.config.hidden_size), jnp.float32)
  return nn.unbox(model.init(rng, feat)["params"])


def abstract_params(model: SemanticCodec):
  """Parameter shapes (jax.ShapeDtypeStruct tree) without allocating."""
  return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def reconstruction_loss(rec: jax.Array, target: jax.Array, valid: jax.Array | None = None,
                        l1_weight: float = 1.0, mse_weight: float = 1.0) -> jax.Array:
  """l1_weight * mean|rec - target| + mse_weight * mean (rec - target)^2 over valid frames."""
  diff = rec.astype(jnp.float32) - target.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(diff.shape[:2], bool)
  w = valid.astype(jnp.float32)[..., None]
  denom = jnp.maximum(jnp.sum(w) * diff.shape[-1], 1.0)
  return (l1_weight * jnp.sum(jnp.abs(diff) * w) + mse_weight * jnp.sum(jnp.square(diff) * w)) / denom
