"""The tokenizers the data job and decoding load, whatever kind they are.

`data.tokenizer` defines the interfaces and the k-means tokenizer (numpy/JAX only, no model);
the SSL tokenizer (w2v-BERT 2.0 + semantic codec, `ssl_tokenizer`) registers itself there when
this module is imported, and the neural acoustic codec is wrapped here as an `AcousticTokenizer`.
Commands (`data.tokenize`, `decode`) load tokenizers through this module.
"""

import numpy as np

from metis_jax.conversion import acoustic_codec as acoustic_codec_conversion
from metis_jax.data import tokenizer as tokenizer_lib
from metis_jax.frontend import ssl_tokenizer  # noqa: F401  (registers type "w2v_bert_codec")
from metis_jax.models import acoustic_codec


def load_tokenizer(directory: str) -> tokenizer_lib.SSLTokenizer:
  """The SSL tokenizer saved in `directory` (k-means or w2v-BERT + semantic codec)."""
  return tokenizer_lib.load_tokenizer(directory)


def acoustic_tokenizer_from_config(cfg):
  """The acoustic codec named by `config.data.acoustic_codec_*`, or None."""
  if not cfg.acoustic_codec_encoder:
    return None
  if not cfg.acoustic_codec_decoder:
    raise ValueError("data.acoustic_codec_encoder is set but data.acoustic_codec_decoder is not "
                     "(the codec's quantizer lives in the decoder file)")
  return CodecAcousticTokenizer.from_files(cfg.acoustic_codec_encoder, cfg.acoustic_codec_decoder)


class CodecAcousticTokenizer:
  """The codec's encoder behind the data job's `AcousticTokenizer` interface.

  `tokenize(waveforms [batch, samples] at 24 kHz, lengths [batch])` ->
  (codes int32 `[batch, samples // hop, num_quantizers]`, frame lengths `[batch]`),
  codes zero past each length.
  """

  def __init__(self, inference: acoustic_codec.AcousticCodecInference):
    self.inference = inference
    self.sample_rate = inference.config.sample_rate
    self.frame_rate = inference.config.sample_rate // inference.config.hop_size
    self.num_quantizers = inference.config.num_quantizers

  @classmethod
  def from_files(cls, encoder_path: str, decoder_path: str) -> "CodecAcousticTokenizer":
    config, params = acoustic_codec_conversion.load_amphion(encoder_path, decoder_path)
    return cls(acoustic_codec.AcousticCodecInference(config, params))

  def tokenize(self, waveforms, lengths):
    lengths = np.asarray(lengths)
    codes = np.asarray(self.inference.encode(waveforms, lengths))
    frames = (lengths // self.inference.hop).astype(np.int32)
    valid = np.arange(codes.shape[1])[None, :] < frames[:, None]
    return np.where(valid[..., None], codes, 0).astype(np.int32), frames
