"""16 kHz waveforms -> normalized w2v-BERT 2.0 layer-17 features (the SSL features of Metis).

  waveforms [batch, samples] (16 kHz, zero-padded) + num_samples [batch]
    -> `fbank.extract`                      [batch, T, 160], T = ceil(F / 2)
    -> `w2v_bert.W2VBert` (17 blocks)       hidden_states[17], [batch, T, 1024]
    -> (h - mean) / sqrt(var)               Amphion's `wav2vec2bert_stats`
    -> zero at tokens >= lengths            [batch, T, 1024] float32 + lengths

These features feed the semantic codec (`semantic_codec.SemanticCodec.quantize`
-> SSL tokens) and are the frame-level conditions of the fine-tuned tasks:
SE uses the noisy input's features; TSE and VC use the features of
concat(prompt, mixture/source) as one waveform.

Usage:
  extractor = SSLFeatureExtractor.from_files("w2v-bert-2.0/model.safetensors", "w2v_stats.npz")
  feats, lengths = extractor(waveforms, num_samples)

`features` is also a plain function (jit it with the config static) for use
inside larger jitted programs (e.g. on-the-fly conditions in fine-tuning).
Gradients are stopped: the encoder is frozen in Metis.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.frontend import fbank
from metis_jax.models import w2v_bert
from metis_jax.conversion import w2v_bert as convert


def features(config: w2v_bert.W2VBertConfig, params: dict, mean: jax.Array, var: jax.Array,
             waveforms: jax.Array, num_samples: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Normalized layer-`config.output_layer` features of a padded 16 kHz batch.

  Args:
    config: encoder config (static under jit).
    params: `W2VBert` parameters.
    mean, var: `[hidden]` normalization statistics (`conversion.w2v_bert.load_stats`).
    waveforms: `[batch, samples]` float in [-1, 1], right-padded.
    num_samples: `[batch]` real samples per row (default: all).

  Returns:
    (features `[batch, T, hidden]` float32, zero at tokens >= lengths;
    lengths `[batch]` int32 = ceil(F / 2) with F = floor((n - 400) / 160) + 1).
  """
  fb = fbank.extract(waveforms, num_samples)
  h = w2v_bert.W2VBert(config).apply({"params": params}, fb.features, fb.mask)
  h = (h.astype(jnp.float32) - mean.astype(jnp.float32)) * jax.lax.rsqrt(var.astype(jnp.float32))
  valid = jnp.arange(h.shape[1])[None, :] < fb.lengths[:, None]
  h = jnp.where(valid[..., None], h, 0.0)
  return jax.lax.stop_gradient(h), fb.lengths


class SSLFeatureExtractor:
  """Holds the encoder parameters and statistics; `__call__` is jitted (one compile per input shape).

  Pad batches to a few fixed widths (`fbank.pad_waveforms(..., multiple=...)`)
  to bound recompilation.
  """

  def __init__(self, config: w2v_bert.W2VBertConfig, params: dict, mean, var):
    if np.shape(mean) != (config.hidden_size,) or np.shape(var) != (config.hidden_size,):
      raise ValueError(f"mean/var must be [{config.hidden_size}], got {np.shape(mean)} and {np.shape(var)}")
    self.config = config
    self.params = jax.device_put(params)  # once, not on every call
    self.mean = jnp.asarray(mean, jnp.float32)
    self.var = jnp.asarray(var, jnp.float32)
    self._fn = jax.jit(functools.partial(features, config))

  sample_rate = fbank.SAMPLE_RATE
  frame_rate = fbank.SAMPLE_RATE // (fbank.HOP_LENGTH * fbank.STRIDE)  # 50

  @classmethod
  def from_files(cls, weights_path: str, stats_path: str,
                 config: Optional[w2v_bert.W2VBertConfig] = None) -> "SSLFeatureExtractor":
    """From `facebook/w2v-bert-2.0` `model.safetensors` and the stats .npz (`convert_stats`).

    Without `config`, it comes from the `config.json` beside the weights (or
    the file's shapes): 17 of 24 blocks, scanned, float32. Pass a config to
    change `output_layer`, `dtype` (e.g. "bfloat16" on accelerators) or
    `scan_layers`; the file must match it.
    """
    config, params = convert.load_hf(weights_path, config)
    mean, var = convert.load_stats(stats_path, config.hidden_size)
    return cls(config, params, mean, var)

  def __call__(self, waveforms, num_samples=None) -> tuple[jax.Array, jax.Array]:
    """`[batch, samples]` 16 kHz (+ `[batch]` lengths) -> (features `[batch, T, hidden]`, lengths `[batch]`)."""
    waveforms = jnp.asarray(waveforms, jnp.float32)
    if num_samples is None:
      num_samples = jnp.full((waveforms.shape[0],), waveforms.shape[1], jnp.int32)
    return self._fn(self.params, self.mean, self.var, waveforms, jnp.asarray(num_samples, jnp.int32))

  def from_list(self, waveforms, multiple: int = 16000) -> list[np.ndarray]:
    """List of 1-D 16 kHz arrays -> list of `[T_i, hidden]` numpy feature arrays (one padded batch)."""
    batch, lengths = fbank.pad_waveforms(waveforms, multiple)
    feats, token_lengths = self(batch, lengths)
    feats, token_lengths = np.asarray(feats), np.asarray(token_lengths)
    return [feats[i, :token_lengths[i]] for i in range(len(waveforms))]
