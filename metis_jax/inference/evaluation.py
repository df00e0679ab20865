"""Measuring generated speech: signal metrics, model likelihood, pluggable ASR and speaker models,
and the per-example report with its summary table.

Always: duration and real-time factor (wall seconds of generation / seconds
generated; below 1 is faster than real time).
Where a reference exists:
  * masked-token NLL (nats per token) of the reference's SSL tokens under the
    stage-1 model, given the prompt (and phones): the mean cross-entropy at
    masked positions over fixed mask ratios gamma(t) = sin(pi t / 2), t in
    `NLL_TIMES`, with the masks drawn from the example's key;
  * for tasks with a time-aligned clean reference (resynthesis, SE, TSE, VC
    when the manifest says `reference_aligned`): SI-SNR (dB) and log-mel
    distance (mean |log mel_a - log mel_b|, 80 bins, 24 kHz), and STOI / PESQ
    when `pystoi` / `pesq` are installed (optional imports);
  * for SE / TSE / VC the same measures of the input itself against the
    reference (`<measure>_input`: the noisy input, the mixture, the perturbed
    source), the baseline a model must beat, and the token accuracy of the
    generated SSL tokens and of the input's own tokens against the
    reference's (`token_accuracy`, `token_accuracy_input`; one-call inputs).
  Adapter models (SE, TSE, VC, L2S) score the reference under their condition.
`baseline_rows` puts each measure's input and output means side by side.
Hooks, loaded from `module:factory` strings and the weights they are pointed
at: an ASR model (`factory(weights)(wav, sample_rate, language) -> text`)
gives the word error rate against the text said, a speaker-embedding model
(`factory(weights)(wav, sample_rate) -> vector`) the cosine similarity of the
output to the prompt.
"""

import dataclasses
import importlib
import json
import math
import os
import re
import unicodedata
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.inference import decoding
from metis_jax.models import masking

NLL_TIMES = (0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------- signal metrics


def si_snr(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-8) -> float:
  """Scale-invariant signal-to-noise ratio in dB (both zero-mean; the shorter length is used)."""
  n = min(len(estimate), len(reference))
  est = np.asarray(estimate[:n], np.float64)
  ref = np.asarray(reference[:n], np.float64)
  est, ref = est - est.mean(), ref - ref.mean()
  target = (est @ ref) / (ref @ ref + eps) * ref
  noise = est - target
  return float(10 * np.log10((target @ target + eps) / (noise @ noise + eps)))


def log_mel(wav: np.ndarray, sample_rate: int = 24000, n_fft: int = 1024, hop: int = 256,
            num_mels: int = 80) -> np.ndarray:
  """`[frames, num_mels]` natural-log mel power spectrogram (Hann window, floor 1e-5)."""
  from metis_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  wav = np.asarray(wav, np.float64)
  if len(wav) < n_fft:
    wav = np.pad(wav, (0, n_fft - len(wav)))
  frames = 1 + (len(wav) - n_fft) // hop
  idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  spec = np.abs(np.fft.rfft(wav[idx] * np.hanning(n_fft), axis=-1)) ** 2
  fbank = tokenizer_lib.mel_filterbank(num_mels, n_fft, sample_rate, 0.0, sample_rate / 2)
  return np.log(np.maximum(spec @ fbank, 1e-5))


def mel_distance(estimate: np.ndarray, reference: np.ndarray, sample_rate: int = 24000) -> float:
  """Mean absolute log-mel difference (lower is closer)."""
  n = min(len(estimate), len(reference))
  a, b = log_mel(estimate[:n], sample_rate), log_mel(reference[:n], sample_rate)
  return float(np.mean(np.abs(a - b)))


INPUT_SUFFIX = "_input"


def signal_metrics(estimate: np.ndarray, reference: np.ndarray, sample_rate: int, suffix: str = "") -> dict:
  """SI-SNR, mel distance (and STOI / PESQ when installed) of `estimate [n]` against a time-aligned
  `reference [m]` (the shorter length), keys suffixed with `suffix` (e.g. '_input')."""
  out = {"si_snr": si_snr(estimate, reference), "mel_distance": mel_distance(estimate, reference, sample_rate)}
  out.update(optional_metrics(estimate, reference, sample_rate))
  return {k + suffix: v for k, v in out.items()}


def token_accuracy(tokens: np.ndarray, reference: np.ndarray) -> float:
  """Fraction of frames where `tokens [T]` equals `reference [T']` (over the shorter length)."""
  n = min(len(tokens), len(reference))
  if n == 0:
    return float("nan")
  return float(np.mean(np.asarray(tokens[:n]) == np.asarray(reference[:n])))


def optional_metrics(estimate: np.ndarray, reference: np.ndarray, sample_rate: int) -> dict:
  """STOI and wide-band PESQ (16 kHz) if their packages are installed; {} otherwise."""
  out = {}
  n = min(len(estimate), len(reference))
  est, ref = np.asarray(estimate[:n], np.float64), np.asarray(reference[:n], np.float64)
  try:
    from pystoi import stoi  # pylint: disable=g-import-not-at-top
    out["stoi"] = float(stoi(ref, est, sample_rate, extended=False))
  except ImportError:
    pass
  try:
    from pesq import pesq  # pylint: disable=g-import-not-at-top
    from metis_jax.data import audio  # pylint: disable=g-import-not-at-top
    r16 = audio.resample(ref.astype(np.float32), sample_rate, 16000)
    e16 = audio.resample(est.astype(np.float32), sample_rate, 16000)
    out["pesq"] = float(pesq(16000, r16, e16, "wb"))
  except ImportError:
    pass
  except Exception as e:  # pesq raises on silent or too-short audio  pylint: disable=broad-except
    out["pesq_error"] = str(e)
  return out


# ----------------------------------------------------------------------------- text metrics


def normalize_transcript(text: str) -> list[str]:
  """Lower-cased words without punctuation (for WER)."""
  text = unicodedata.normalize("NFKC", text or "").lower()
  text = re.sub(r"[^\w\s']", " ", text)
  return [w.strip("'") for w in text.split() if w.strip("'")]


def word_error_rate(hypothesis: str, reference: str) -> float:
  """(substitutions + deletions + insertions) / reference words (Levenshtein over words)."""
  hyp, ref = normalize_transcript(hypothesis), normalize_transcript(reference)
  if not ref:
    return 0.0 if not hyp else 1.0
  prev = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    cur = [i] + [0] * len(hyp)
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return prev[-1] / len(ref)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def load_hook(spec: str, weights: Optional[str] = None) -> Callable:
  """`'package.module:factory'` -> factory(weights) (or factory() without weights).

  The factory loads the user's model once and returns the callable used per
  example. Errors name the spec.
  """
  if ":" not in spec:
    raise ValueError(f"hook {spec!r}: expected 'module:factory'")
  module_name, attr = spec.split(":", 1)
  try:
    factory = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"hook {spec!r}: cannot import ({e})") from e
  return factory(weights) if weights else factory()


# ----------------------------------------------------------------------------- model likelihood


def make_masked_nll(model, times: Sequence[float] = NLL_TIMES, schedule: str = "sine"):
  """A jitted fn(params, keys, prompt, prompt_lengths, target, target_lengths, phones,
  phone_lengths, features=None) -> `[batch]` mean NLL (nats/token) of `target` under the
  stage-1 model.

  The layout matches `decoding.MetisDecoder` ([phones | prompt | target],
  compact RoPE positions); `phones` may be None for models without phones;
  `features` `[batch, frames, cond_dim]` are the adapter models' contiguous
  [prompt; target] condition frames (as `MetisDecoder`'s `features`).
  """
  ratios = masking.mask_ratio(np.asarray(times, np.float32), schedule).astype(np.float32)

  def fn(params, keys, prompt, prompt_lengths, target, target_lengths, phones, phone_lengths,
         features=None):
    batch, p = prompt.shape
    t_len = target.shape[1]
    prompt_valid = decoding.lengths_to_valid(prompt_lengths, p)
    target_valid = decoding.lengths_to_valid(target_lengths, t_len)
    valid = jnp.concatenate([prompt_valid, target_valid], axis=1)
    seq = jnp.concatenate([prompt, target], axis=1).astype(jnp.int32)
    extra = {}
    if phones is not None:
      extra = dict(phones=phones, phone_valid=decoding.lengths_to_valid(phone_lengths, phones.shape[1]))
    if features is None and model.config.cond_feature_dim:  # Omni's TTS: no adapter output
      features = jnp.zeros((batch, p + t_len, model.config.cond_feature_dim), jnp.float32)
      params = decoding.without_adapter(params)
    if features is not None:
      extra["features"] = jnp.concatenate(decoding.split_features(features, prompt_lengths, p, t_len),
                                          axis=1)
    total = jnp.zeros((batch,), jnp.float32)
    for k, (t, ratio) in enumerate(zip(times, ratios)):
      scores = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, k), (t_len,)))(keys)
      scores = jnp.where(target_valid, scores, jnp.inf)
      n_mask = jnp.maximum(jnp.floor(target_lengths * ratio), 1).astype(jnp.int32)
      masked = decoding.remask_least_confident(scores, target_valid, n_mask)
      is_masked = jnp.concatenate([jnp.zeros_like(prompt_valid), masked], axis=1)
      _, logits = model.apply({"params": params}, seq, is_masked, valid,
                              jnp.full((batch,), t, jnp.float32), **extra)
      logp = jax.nn.log_softmax(logits[:, p:].astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
      total = total + jnp.sum(jnp.where(masked, nll, 0.0), -1) / jnp.maximum(masked.sum(-1), 1)
    return total / len(times)

  return jax.jit(fn)


# ----------------------------------------------------------------------------- report

# Measures with a baseline (the input's `<key>_input`): (key, name, format, higher is better).
BASELINE_MEASURES = (
    ("si_snr", "SI-SNR dB", "{:.2f}", True), ("mel_distance", "mel dist", "{:.3f}", False),
    ("stoi", "STOI", "{:.3f}", True), ("pesq", "PESQ", "{:.2f}", True),
    ("token_accuracy", "tok acc", "{:.3f}", True))

# Columns of the summary table: (key, header, format); each baseline measure's output column is
# followed by the input's.
SUMMARY_COLUMNS = (
    (("seconds", "audio s", "{:.2f}"), ("rtf", "RTF", "{:.3f}"), ("nll", "NLL", "{:.3f}"))
    + tuple(col for key, name, fmt, _ in BASELINE_MEASURES
            for col in ((key, name, fmt), (key + INPUT_SUFFIX, "input " + name, fmt)))
    + (("wer", "WER", "{:.3f}"), ("speaker_similarity", "spk sim", "{:.3f}")))


def _means(rows: Sequence[dict], key: str) -> list:
  return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def baseline_rows(rows: Sequence[dict], by: str = "task") -> list[dict]:
  """Per group of successful rows and baseline measure with both sides: {group, measure, key, n,
  input, output, delta (output - input), better (the output beats the input), format}.

  `n` counts the examples with both values; the means are over those examples.
  """
  ok = [r for r in rows if r.get("status") == "ok"]
  groups: dict[str, list[dict]] = {}
  for r in ok:
    groups.setdefault(str(r.get(by, "")), []).append(r)
  out = []
  for group, members in groups.items():
    for key, name, fmt, higher in BASELINE_MEASURES:
      both = [r for r in members if _means([r], key) and _means([r], key + INPUT_SUFFIX)]
      if not both:
        continue
      inp, outp = float(np.mean(_means(both, key + INPUT_SUFFIX))), float(np.mean(_means(both, key)))
      out.append({"group": group, "measure": name, "key": key, "n": len(both), "input": inp, "output": outp,
                  "delta": outp - inp, "better": outp > inp if higher else outp < inp, "format": fmt})
  return out


def baseline_table(rows: Sequence[dict], by: str = "task", input_label: str = "input (baseline)",
                   output_label: str = "output") -> str:
  """`baseline_rows` as a text table ('' when no measure has a baseline)."""
  entries = baseline_rows(rows, by)
  if not entries:
    return ""
  lines = [[by, "measure", "n", input_label, output_label, "output - input", "output better"]]
  for e in entries:
    fmt = e["format"]
    lines.append([e["group"], e["measure"], str(e["n"]), fmt.format(e["input"]), fmt.format(e["output"]),
                  ("+" if e["delta"] >= 0 else "") + fmt.format(e["delta"]), "yes" if e["better"] else "no"])
  widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines)


class Report:
  """Collects one JSON object per example, writes them as JSON lines, summarizes them."""

  def __init__(self, path: Optional[str]):
    self.path = path
    self.rows: list[dict] = []
    self._file = None
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "w", encoding="utf-8")

  def add(self, row: dict) -> None:
    row = {k: _jsonable(v) for k, v in row.items()}
    self.rows.append(row)
    if self._file:
      self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
      self._file.flush()

  def close(self) -> None:
    """Closes the file, rewriting it in example order (rows are appended as examples finish)."""
    if self._file:
      self._file.close()
      self._file = None
      self.rows.sort(key=lambda r: (r.get("index", 0), str(r.get("id", ""))))
      with open(self.path, "w", encoding="utf-8") as f:
        for row in self.rows:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")

  def summary(self, wall_seconds: float) -> dict:
    ok = [r for r in self.rows if r.get("status") == "ok"]
    seconds = sum(r.get("seconds", 0.0) for r in ok)
    out = {"examples": len(self.rows), "ok": len(ok), "failed": len(self.rows) - len(ok),
           "audio_seconds": seconds, "wall_seconds": wall_seconds,
           "examples_per_second": len(ok) / wall_seconds if wall_seconds > 0 else 0.0,
           "rtf": wall_seconds / seconds if seconds > 0 else None}
    for key, _, _ in SUMMARY_COLUMNS:
      values = _means(ok, key)
      if values and key not in ("seconds", "rtf"):
        out[f"mean_{key}"] = float(np.mean(values))
    return out

  def table(self, by: str = "task") -> str:
    """A text table: one row per group (e.g. task) of successful examples, means per metric."""
    ok = [r for r in self.rows if r.get("status") == "ok"]
    groups: dict[str, list[dict]] = {}
    for r in ok:
      groups.setdefault(str(r.get(by, "")), []).append(r)
    cols = [c for c in SUMMARY_COLUMNS if any(isinstance(r.get(c[0]), (int, float)) for r in ok)]
    header = [by, "n"] + [h for _, h, _ in cols]
    lines = [header]
    for name, rows in groups.items():
      line = [name, str(len(rows))]
      for key, _, fmt in cols:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        line.append(fmt.format(float(np.mean(values))) if values else "-")
      lines.append(line)
    failed = len(self.rows) - len(ok)
    widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines)
    baseline = baseline_table(self.rows, by)
    if baseline:
      text += "\n\nagainst the input (the baseline):\n" + baseline
    return text + (f"\nfailed: {failed}" if failed else "")


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, np.ndarray):
    return v.tolist()
  if dataclasses.is_dataclass(v):
    return dataclasses.asdict(v)
  return v
