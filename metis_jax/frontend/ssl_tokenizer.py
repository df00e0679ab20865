"""Metis's SSL tokenizer: w2v-BERT 2.0 layer-17 features quantized by the semantic codec.

  waveforms 16 kHz [batch, samples] + lengths
    -> ssl_features.features   normalized layer-17 features [batch, T, 1024]
    -> SemanticCodec.quantize   codes [batch, T] (8192 codes, 50 Hz)

It implements `data.tokenizer.SSLTokenizer` (registered as type
"w2v_bert_codec"), so the tokenization job uses it like the k-means one, and
also returns the features themselves (the frame-level condition of VC, SE and
TSE). A saved tokenizer is a folder: `tokenizer.json`, the encoder in the
Hugging Face layout (`w2v_bert.safetensors`), the statistics
(`w2v_stats.npz`) and the codec in the Amphion layout
(`semantic_codec.safetensors`), so released files drop in unchanged.

Batches run sharded over a `batch_layout.BatchLayout` (default: data parallel
over this process's devices): the jitted function has explicit shardings,
rows split over the devices and parameters replicated; a batch is padded up
to a multiple of the devices with copies of its last row, dropped again from
the outputs. `with_layout` gives the same tokenizer on another layout (e.g.
the decode mesh over several processes, where every process passes its own
rows). A row's codes do not depend on the layout.
"""

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.parallel import batch_layout
from metis_jax.models import semantic_codec, w2v_bert
from metis_jax.frontend import ssl_features
from metis_jax.conversion import semantic_codec as convert_codec
from metis_jax.conversion import w2v_bert as convert_w2v
from metis_jax.data import tokenizer as tokenizer_lib

TYPE = "w2v_bert_codec"
ENCODER_FILE = "w2v_bert.safetensors"
STATS_FILE = "w2v_stats.npz"
CODEC_FILE = "semantic_codec.safetensors"


def tokenize_features(encoder_config: w2v_bert.W2VBertConfig,
                      codec_config: semantic_codec.SemanticCodecConfig, encoder_params, mean, var,
                      codec_params, waveforms, lengths):
  """Pure function: `[batch, samples]` 16 kHz -> (codes `[batch, T]`, lengths `[batch]`, features).

  Codes past each length are 0; features `[batch, T, hidden]` are zero there.
  """
  feats, token_lengths = ssl_features.features(encoder_config, encoder_params, mean, var,
                                               waveforms, lengths)
  valid = jnp.arange(feats.shape[1])[None, :] < token_lengths[:, None]
  codes, _ = semantic_codec.SemanticCodec(codec_config).apply(
      {"params": codec_params}, feats, valid, method=semantic_codec.SemanticCodec.quantize)
  return jnp.where(valid, codes, 0).astype(jnp.int32), token_lengths, feats


@tokenizer_lib.register(TYPE)
class W2VBertCodecTokenizer:
  """w2v-BERT 2.0 (to layer 17) + normalization + semantic codec; jitted and sharded over `layout`,
  one compilation per padded shape.

  Args:
    encoder_config, encoder_params: the w2v-BERT encoder.
    mean, var: `[hidden]` normalization statistics.
    codec_config, codec_params: the semantic codec.
    layout: where batches run (default: `BatchLayout.local()`, all local devices).
  """
  sample_rate = 16000
  frame_rate = 50

  def __init__(self, encoder_config, encoder_params, mean, var, codec_config, codec_params,
               layout: Optional[batch_layout.BatchLayout] = None):
    self.encoder_config, self.codec_config = encoder_config, codec_config
    self.vocab_size = codec_config.codebook_size
    self.layout = layout if layout is not None else batch_layout.BatchLayout.local()
    params = (encoder_params, np.asarray(mean, np.float32), np.asarray(var, np.float32), codec_params)
    shardings = jax.tree.map(lambda _: self.layout.replicated, params)
    self.encoder_params, self.mean, self.var, self.codec_params = self.layout.put_params(params, shardings)
    pure = functools.partial(tokenize_features, encoder_config, codec_config)
    self._fn = self.layout.jit(lambda p, w, l: pure(*p, w, l), shardings, 2)

  def with_layout(self, layout: batch_layout.BatchLayout) -> "W2VBertCodecTokenizer":
    """The same tokenizer running on `layout`."""
    return type(self)(self.encoder_config, _host(self.encoder_params), _host(self.mean), _host(self.var),
                      self.codec_config, _host(self.codec_params), layout)

  @classmethod
  def from_files(cls, encoder_path: str, stats_path: str, codec_path: str,
                 encoder_config=None, codec_config=None, layout=None) -> "W2VBertCodecTokenizer":
    """From released files: `facebook/w2v-bert-2.0` safetensors, the stats .npz
    (`conversion.w2v_bert.convert_stats`) and the semantic codec safetensors."""
    encoder_config, encoder_params = convert_w2v.load_hf(encoder_path, encoder_config)
    mean, var = convert_w2v.load_stats(stats_path, encoder_config.hidden_size)
    codec_config, codec_params = convert_codec.load_amphion(codec_path, codec_config)
    if codec_config.hidden_size != encoder_config.hidden_size:
      raise ValueError(f"{codec_path}: codec width {codec_config.hidden_size} does not match the "
                       f"encoder's {encoder_config.hidden_size}")
    return cls(encoder_config, encoder_params, mean, var, codec_config, codec_params, layout)

  def encode(self, waveforms, lengths):
    """(codes `[batch, T]` int32, lengths `[batch]` int32, features `[batch, T, hidden]` float32),
    numpy, for this process's rows `waveforms` `[batch, samples]` (16 kHz) and `lengths` `[batch]`.

    The rows are padded to a multiple of this process's devices (copies of
    the last row) and sharded over them; the padding is dropped from the outputs.
    """
    waveforms = np.asarray(waveforms, np.float32)
    lengths = np.asarray(lengths, np.int32)
    n = waveforms.shape[0]
    if n == 0:
      raise ValueError("an empty batch")
    multiple = self.layout.shards // self.layout.process_count
    rows = -(-n // multiple) * multiple
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)]) if rows > n else x
    params = (self.encoder_params, self.mean, self.var, self.codec_params)
    out = self._fn(params, self.layout.put(pad(waveforms)), self.layout.put(pad(lengths)))
    return tuple(self.layout.get(x)[:n] for x in out)

  def tokenize(self, waveforms, lengths):
    """SSLTokenizer interface: (tokens int32 `[batch, T]`, token_lengths int32 `[batch]`) numpy."""
    codes, token_lengths, _ = self.encode(waveforms, lengths)
    return codes, token_lengths

  def config(self) -> dict:
    return {"type": TYPE, "version": 1, "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate, "vocab_size": self.vocab_size,
            "encoder": dataclasses.asdict(self.encoder_config),
            "codec": dataclasses.asdict(self.codec_config)}

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    encoder, mean, var, codec = _host((self.encoder_params, self.mean, self.var, self.codec_params))
    convert_w2v.save_hf(os.path.join(directory, ENCODER_FILE), encoder, self.encoder_config)
    np.savez(os.path.join(directory, STATS_FILE), mean=mean, var=var)
    convert_codec.save_amphion(os.path.join(directory, CODEC_FILE), codec, self.codec_config)
    with open(os.path.join(directory, tokenizer_lib.CONFIG_NAME), "w", encoding="utf-8") as f:
      json.dump(self.config(), f, indent=1)

  @classmethod
  def load(cls, directory: str) -> "W2VBertCodecTokenizer":
    with open(os.path.join(directory, tokenizer_lib.CONFIG_NAME), encoding="utf-8") as f:
      cfg = json.load(f)
    if cfg.get("type") != TYPE:
      raise ValueError(f"{directory}: tokenizer type {cfg.get('type')!r} is not {TYPE!r}")
    encoder_config = w2v_bert.W2VBertConfig(**cfg["encoder"])
    codec_config = semantic_codec.SemanticCodecConfig(**cfg["codec"])
    return cls.from_files(os.path.join(directory, ENCODER_FILE), os.path.join(directory, STATS_FILE),
                          os.path.join(directory, CODEC_FILE), encoder_config, codec_config)


def _host(tree):
  """Numpy copies of replicated (possibly multi-process) arrays: each from one local replica."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree)
