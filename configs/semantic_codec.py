"""The semantic codec (RepCodec) at the released size: 8192 x 8 codebook, 12 + 12 Vocos layers.

Train (synthetic features; the reconstruction loss is L1 + MSE, our decision):
  python -m metis_jax.codec_train --config configs/semantic_codec.py --synthetic_features \
      --workdir /tmp/semantic_codec
Convert the released weights: metis_jax.conversion.semantic_codec.load_amphion(path).
"""

from metis_jax import semantic_codec


def get_config():
  return semantic_codec.default_config()
