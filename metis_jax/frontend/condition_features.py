"""Frame-level condition features of the fine-tuned tasks (SE, TSE, VC, Omni), from 16 kHz audio.

One entry point, `condition_features(kind, wav16k, ...)`, so a model decides
which feature its adapter reads (`config.model.cond_feature`, default
"w2v_bert") and new kinds plug in with `register`:

  w2v_bert  normalized w2v-BERT 2.0 layer-17 features `[T, 1024]` (spec §8), the
            released fine-tunes' condition. Computed by the encoder of the
            SSL tokenizer (`ssl_tokenizer.W2VBertCodecTokenizer.encode`) or an
            `ssl_features.SSLFeatureExtractor`.
  cheap     `[T, 160]`: the k-means tokenizer's features (80 Kaldi log-mel
  (log_mel) bins of 25 ms frames every 10 ms, normalized per utterance and bin,
            frame pairs stacked), for tiny demo fine-tunes that run without
            w2v-BERT; the same numpy function the fine-tuning data pipeline
            uses (`data.condition_features.cheap_condition_features`). No model.

Both give T = ceil(F / 2) frames at 50 Hz for N samples (F = floor((N - 400)
/ 160) + 1), the SSL token count of the same audio, so frame j conditions
token j.
"""

from typing import Callable, Optional, Sequence, Union

import numpy as np

DEFAULT_KIND = "w2v_bert"

# kind -> fn(waveforms [B, N] float32, lengths [B] int32, encoder) -> (features [B, T, D], lengths [B]).
_KINDS: dict = {}
_DIMS: dict = {}


class ConditionFeatureError(ValueError):
  """Features that cannot be computed with what was loaded (the message says what to give)."""


def register(kind: str, dim: Optional[int] = None):
  """Decorator adding a feature kind; `dim` is its width when fixed (None: the encoder's)."""
  def wrap(fn: Callable):
    _KINDS[kind] = fn
    _DIMS[kind] = dim
    return fn
  return wrap


def kinds() -> tuple:
  return tuple(sorted(_KINDS))


def kind_of(model_config) -> str:
  """The feature kind a stage-1 model config declares (`cond_feature`; default w2v_bert)."""
  kind = model_config.get("cond_feature", None) if hasattr(model_config, "get") else None
  return str(kind or DEFAULT_KIND)


def feature_dim(kind: str, encoder=None) -> Optional[int]:
  """Width of a kind's features (None when only the encoder knows it and none is given)."""
  _check(kind)
  if _DIMS[kind] is not None:
    return _DIMS[kind]
  config = getattr(encoder, "encoder_config", None) or getattr(encoder, "config", None)
  return getattr(config, "hidden_size", None)


def _check(kind: str) -> None:
  if kind not in _KINDS:
    raise ConditionFeatureError(f"unknown condition feature {kind!r}; known: {', '.join(kinds())}")


def condition_features(kind: str, wav16k: Union[np.ndarray, Sequence[np.ndarray]],
                       lengths: Optional[np.ndarray] = None, *, encoder=None):
  """Condition features of 16 kHz audio.

  Args:
    kind: a registered kind ("w2v_bert", "cheap" / "log_mel", ...).
    wav16k: one waveform `[N]`, or a padded batch `[B, N]` (with `lengths`).
    lengths: `[B]` real samples per row (batch input; default all).
    encoder: what the kind needs (w2v_bert: the SSL tokenizer or an
      `SSLFeatureExtractor`).

  Returns:
    `[T, D]` float32 for one waveform; for a batch (features `[B, T, D]`,
    lengths `[B]` int32), zero past each length.
  """
  _check(kind)
  wav = np.asarray(wav16k, np.float32)
  single = wav.ndim == 1
  if single:
    wav = wav[None]
  if lengths is None:
    lengths = np.full((wav.shape[0],), wav.shape[1], np.int32)
  feats, out_lengths = _KINDS[kind](wav, np.asarray(lengths, np.int32), encoder)
  feats, out_lengths = np.asarray(feats, np.float32), np.asarray(out_lengths, np.int32)
  return feats[0, :out_lengths[0]] if single else (feats, out_lengths)


@register("w2v_bert")
def _w2v_bert(wav, lengths, encoder):
  if encoder is None:
    raise ConditionFeatureError(
        "w2v_bert condition features need the w2v-BERT 2.0 encoder: give --tokenizer a w2v-BERT + "
        "semantic codec tokenizer folder (the k-means tokenizer has no encoder)")
  if hasattr(encoder, "encode"):  # the SSL tokenizer: (codes, lengths, features)
    _, token_lengths, feats = encoder.encode(wav, lengths)
    return feats, token_lengths
  if callable(encoder) and hasattr(encoder, "mean"):  # ssl_features.SSLFeatureExtractor
    return encoder(wav, lengths)
  raise ConditionFeatureError(
      f"w2v_bert condition features need the w2v-BERT encoder; the loaded tokenizer "
      f"({type(encoder).__name__}) has none: use a w2v-BERT + semantic codec tokenizer folder")


@register("cheap", dim=160)
def _cheap(wav, lengths, encoder):
  del encoder
  from metis_jax.data import condition_features as data_features  # pylint: disable=g-import-not-at-top
  return data_features.cheap_condition_features(wav, lengths)


register("log_mel", dim=160)(_cheap)
