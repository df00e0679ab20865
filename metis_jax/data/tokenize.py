"""The tokenization job: a corpus of audio -> ArrayRecord shards of tokens.

Run:
  python -m metis_jax.data.tokenize --config configs/tiny.py \
      --input /data/corpus --output /data/corpus_tokens \
      --config.data.tokenizer_dir=/data/kmeans_tokenizer

How it works:
  * `readers.plan_units` splits the input into work units (a run of
    `files_per_shard` files, or one tar); unit i becomes the shard
    `tokens-i-of-n.array_record`. JAX process p of P takes units i % P == p, so
    processes never overlap, and the output does not depend on P.
  * A unit is decoded on `decode_threads` threads (mono, resampled to 16 kHz,
    and 24 kHz when an acoustic tokenizer is given), checked, grouped by
    length into padded batches of a few fixed shapes, and tokenized by the
    jitted tokenizer with the batch sharded over all local devices (each
    process tokenizes its own units on its own devices).
  * Records (see `records`) are written sorted by id; the shard's stats go to
    `tokens-i-of-n.stats.json`, then the shard is renamed into place: a shard
    exists only when complete. A rerun skips finished shards and rewrites
    unfinished ones (a left-over `.tmp` is removed), so it is resumable and
    idempotent. `job.json` records the plan; rerunning on a different input
    into the same output is an error.
  * When every shard exists, `manifest.json` is written (utterances, hours,
    hours per language, skipped files with reasons).
Nothing that is wrong with one file stops the job: it is skipped and counted.

With `--record_sources` (directory layouts) each record also names its source
audio file relative to the corpus root (record field 'src'), which the task
pipelines of fine-tuning (`metis_jax.data.tasks`) read the audio from; the
corpus root is the manifest's 'input'. A phonemizer may return None for an
utterance it has no phones for (the record then has none; it is not skipped).
"""

import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from metis_jax.data import audio
from metis_jax.data import manifest as manifest_lib
from metis_jax.data import readers
from metis_jax.data import records
from metis_jax.data import shards
from metis_jax.data import tokenizer as tokenizer_lib

JOB_NAME = "job.json"


@dataclasses.dataclass
class Decoded:
  """A decoded utterance: waveforms float32 [samples] per sample rate."""
  utt: readers.Utterance
  waves: dict[int, np.ndarray]
  duration: float


@dataclasses.dataclass
class JobResult:
  """What a run did (for logs and tests)."""
  shards_written: list[str]
  shards_skipped: list[str]
  utterances: int
  audio_seconds: float
  tokenize_seconds: float
  manifest: Optional[dict[str, Any]]


def decode_utterance(utt: readers.Utterance, rates: Sequence[int], cfg) -> Union[Decoded, readers.Skipped]:
  """Decodes and checks one utterance; every failure becomes a `Skipped`."""
  try:
    waves, duration = audio.load(utt.audio, tuple(rates), name=utt.origin,
                                 silence_threshold_db=cfg.silence_threshold_db)
  except audio.AudioError as e:
    return readers.Skipped(utt.origin, str(e).removeprefix(utt.origin + ": "))
  except Exception as e:  # pylint: disable=broad-except
    # A decoder crash on one file must not stop the job.
    return readers.Skipped(utt.origin, f"cannot decode audio ({type(e).__name__}: {e})")
  problem = readers.duration_problem(duration, cfg.min_duration, cfg.max_duration)
  if problem:
    return readers.Skipped(utt.origin, problem)
  utt.audio = ""  # Drop the encoded bytes.
  return Decoded(utt, waves, duration)


def decode_unit(unit: readers.WorkUnit, cfg, rates: Sequence[int],
                pool: concurrent.futures.Executor) -> tuple[list[Decoded], list[readers.Skipped]]:
  """Reads and decodes a unit on `pool`; drops duplicate ids (first one wins)."""
  futures, skipped = [], []
  for item in readers.read_unit(unit, cfg.min_duration, cfg.max_duration, cfg.min_dnsmos, cfg.default_language):
    if isinstance(item, readers.Skipped):
      skipped.append(item)
    else:
      futures.append(pool.submit(decode_utterance, item, rates, cfg))
  decoded, seen = [], set()
  for fut in futures:
    res = fut.result()
    if isinstance(res, readers.Skipped):
      skipped.append(res)
    elif res.utt.id in seen:
      skipped.append(readers.Skipped(res.utt.origin, f"duplicate id {res.utt.id!r}"))
    else:
      seen.add(res.utt.id)
      decoded.append(res)
  return decoded, skipped


def length_batches(lengths: Sequence[int], bucket: int, batch_samples: int,
                   multiple: int = 1) -> list[tuple[list[int], int, int]]:
  """Groups items by padded length into batches of few distinct shapes.

  Args:
    lengths: samples per item.
    bucket: lengths are padded up to a multiple of this.
    batch_samples: samples per batch (rows x padded length) at most, roughly.
    multiple: the batch size is a multiple of this (the local device count).

  Returns:
    [(item indices, padded length, batch rows)]; rows >= len(indices). Full
    batches have the most rows that fit `batch_samples`; a final partial one
    the next power of two, so shapes (compilations) stay few and padding
    rows stay under half a batch.
  """
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  groups: dict[int, list[int]] = {}
  for i in order:
    padded = max(bucket, -(-lengths[i] // bucket) * bucket)
    groups.setdefault(padded, []).append(i)
  out = []
  for padded, idx in sorted(groups.items()):
    full = max(1, batch_samples // padded)
    full = -(-full // multiple) * multiple
    for s in range(0, len(idx), full):
      chunk = idx[s:s + full]
      rows = min(full, 1 << (len(chunk) - 1).bit_length())
      out.append((chunk, padded, -(-rows // multiple) * multiple))
  return out


class DeviceRunner:
  """Runs a tokenizer on padded batches sharded over all local devices.

  A tokenizer with a `layout` and `with_layout` (`ssl_tokenizer.W2VBertCodecTokenizer`) shards
  its batches itself, with explicit shardings, and takes numpy rows; any
  other gets its batches already placed on the local devices (its jitted
  function keeps them sharded). Either way a batch has a multiple of the
  local device count rows.
  """

  def __init__(self, tokenizer, cfg):
    import jax  # pylint: disable=g-import-not-at-top
    self.tokenizer = tokenizer
    self.devices = jax.local_devices()
    layout = getattr(tokenizer, "layout", None) if hasattr(tokenizer, "with_layout") else None
    self.shards_itself = layout is not None
    if self.shards_itself:
      self.multiple = layout.shards // layout.process_count
    else:
      self.multiple = len(self.devices)
      mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
      self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    self.rate = int(tokenizer.sample_rate)
    self.bucket = max(1, int(round(cfg.tokenize_bucket_seconds * self.rate)))
    self.batch_samples = int(cfg.tokenize_batch_seconds * self.rate)
    self.seconds = 0.0  # Wall time spent tokenizing.

  def _place(self, x: np.ndarray):
    if self.shards_itself:
      return x
    import jax  # pylint: disable=g-import-not-at-top
    return jax.device_put(x, self.sharding)

  def __call__(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Tokens for each waveform: a list of int arrays [T] (or [T, q])."""
    out: list[Optional[np.ndarray]] = [None] * len(waves)
    lengths = [len(w) for w in waves]
    t0 = time.perf_counter()
    for idx, padded, rows in length_batches(lengths, self.bucket, self.batch_samples, self.multiple):
      batch = np.zeros((rows, padded), np.float32)
      lens = np.zeros((rows,), np.int32)
      for r, i in enumerate(idx):
        batch[r, :lengths[i]] = waves[i]
        lens[r] = lengths[i]
      tokens, token_lengths = self.tokenizer.tokenize(self._place(batch), self._place(lens))
      tokens, token_lengths = np.asarray(tokens), np.asarray(token_lengths)
      for r, i in enumerate(idx):
        out[i] = tokens[r, :int(token_lengths[r])]
    self.seconds += time.perf_counter() - t0
    return out


def _check_plan(output_dir: str, plan: dict[str, Any]) -> None:
  path = os.path.join(output_dir, JOB_NAME)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if old != plan:
      changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise ValueError(f"{path}: the output was made by a different job (differs in {changed}); "
                       "use a new --output or delete it")
  else:
    shards.write_text_atomic(path, json.dumps(plan, indent=1))


def process_unit(unit: readers.WorkUnit, shard_path: str, decoded: list[Decoded],
                 skipped: list[readers.Skipped], ssl_runner: DeviceRunner,
                 acoustic_runner: Optional[DeviceRunner] = None,
                 phonemizer: Optional[Callable[[str, str], Optional[Sequence[int]]]] = None,
                 record_sources: bool = False) -> int:
  """Tokenizes a decoded unit and writes its stats and shard; returns records written.

  With `record_sources`, records of a 'files' unit carry their audio file's
  path relative to the corpus root ('src'; tar members have no such path).
  """
  skipped = list(skipped)
  ssl_tokens = ssl_runner([d.waves[ssl_runner.rate] for d in decoded])
  acoustic = acoustic_runner([d.waves[acoustic_runner.rate] for d in decoded]) if acoustic_runner else None
  rows, kept = [], []
  for i, d in enumerate(decoded):
    expected = tokenizer_lib.num_ssl_frames(len(d.waves[ssl_runner.rate]))
    if len(ssl_tokens[i]) != expected:
      skipped.append(readers.Skipped(d.utt.origin, f"tokenizer returned {len(ssl_tokens[i])} tokens, "
                                                   f"expected {expected}"))
      continue
    phones = None
    if phonemizer is not None:
      try:
        phones = phonemizer(d.utt.text, d.utt.language)
        phones = None if phones is None else np.asarray(phones, np.int64)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append(readers.Skipped(d.utt.origin, f"phonemizer failed ({type(e).__name__}: {e})"))
        continue
    rec = records.encode(d.utt.id, ssl_tokens[i], text=d.utt.text, speaker=d.utt.speaker,
                         language=d.utt.language, duration=d.duration,
                         acoustic_tokens=None if acoustic is None else acoustic[i], phones=phones,
                         source=d.utt.origin if record_sources and unit.kind == "files" else None)
    rows.append((d.utt.id, rec))
    kept.append({"duration": d.duration, "language": d.utt.language, "tokens": len(ssl_tokens[i])})
  rows.sort(key=lambda r: r[0])
  stats = manifest_lib.shard_stats(os.path.basename(shard_path), unit.index, kept,
                                   [{"file": s.file, "reason": s.reason} for s in skipped])
  shards.write_text_atomic(manifest_lib.stats_path(shard_path), json.dumps(stats, indent=1, ensure_ascii=False))
  return shards.write_shard(shard_path, (r for _, r in rows))


def run(cfg, input_path: str, output_dir: str, *, tokenizer=None, acoustic_tokenizer=None,
        phonemizer: Optional[Callable[[str, str], Optional[Sequence[int]]]] = None,
        record_sources: bool = False,
        process_index: Optional[int] = None, process_count: Optional[int] = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> JobResult:
  """Tokenizes this process's part of a corpus; writes the manifest when all is done.

  Args:
    cfg: the `config.data` ConfigDict.
    input_path: corpus root (see `readers`).
    output_dir: where shards, stats, `job.json` and `manifest.json` go.
    tokenizer: an `SSLTokenizer`; default: `load_tokenizer(cfg.tokenizer_dir)`.
    acoustic_tokenizer: optional `AcousticTokenizer` (adds [T, q] tokens).
    phonemizer: optional `(text, language) -> phone ids` (None: no phones for it).
    record_sources: records name their source audio file ('src', relative to
      `input_path`) for the task pipelines; directory layouts only.
    process_index: this process (default jax.process_index()); passing both
      index and count simulates a multi-process run without jax.distributed.
    process_count: number of processes (default jax.process_count()).
    log: progress messages.

  Returns:
    A `JobResult`; `manifest` is None if other processes' shards are missing.
  """
  simulated = process_index is not None and process_count is not None
  if not simulated:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if tokenizer is None:
    if not cfg.tokenizer_dir:
      raise ValueError("config.data.tokenizer_dir is empty: fit a tokenizer with "
                       "`python -m metis_jax.data.fit_kmeans` and pass its directory")
    tokenizer = tokenizer_lib.load_tokenizer(cfg.tokenizer_dir)
  os.makedirs(output_dir, exist_ok=True)
  units = readers.plan_units(input_path, cfg.layout, cfg.files_per_shard)
  names = [shards.shard_name(u.index, len(units)) for u in units]
  desc = tokenizer_lib.describe(tokenizer)
  _check_plan(output_dir, {"input": os.path.abspath(input_path), "layout": cfg.layout,
                           "files_per_shard": cfg.files_per_shard, "units": readers.unit_fingerprint(units),
                           "tokenizer": desc, "min_duration": cfg.min_duration, "max_duration": cfg.max_duration,
                           "min_dnsmos": cfg.min_dnsmos, "acoustic": acoustic_tokenizer is not None,
                           **({"record_sources": True} if record_sources else {})})
  ssl_runner = DeviceRunner(tokenizer, cfg)
  acoustic_runner = DeviceRunner(acoustic_tokenizer, cfg) if acoustic_tokenizer is not None else None
  rates = sorted({ssl_runner.rate} | ({acoustic_runner.rate} if acoustic_runner else set()))
  mine = [u for u in units if u.index % process_count == process_index]
  todo, done = [], []
  for u in mine:
    path = os.path.join(output_dir, names[u.index])
    (done if os.path.exists(path) and os.path.exists(manifest_lib.stats_path(path)) else todo).append(u)
  log(f"tokenize: process {process_index}/{process_count}: {len(mine)} of {len(units)} shards, "
      f"{len(done)} already finished")
  written, utterances, seconds = [], 0, 0.0
  with concurrent.futures.ThreadPoolExecutor(max(1, cfg.decode_threads)) as pool, \
      concurrent.futures.ThreadPoolExecutor(1) as reader:
    # Decode the next unit while the current one is on the device.
    pending = reader.submit(decode_unit, todo[0], cfg, rates, pool) if todo else None
    for n, unit in enumerate(todo):
      decoded, skipped = pending.result()
      pending = reader.submit(decode_unit, todo[n + 1], cfg, rates, pool) if n + 1 < len(todo) else None
      path = os.path.join(output_dir, names[unit.index])
      count = process_unit(unit, path, decoded, skipped, ssl_runner, acoustic_runner, phonemizer,
                           record_sources)
      utterances += count
      seconds += sum(d.duration for d in decoded)
      written.append(names[unit.index])
      log(f"tokenize: wrote {names[unit.index]}: {count} utterances, {len(skipped)} skipped")
  if process_count > 1 and not simulated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("metis_jax.data.tokenize:done")
  manifest = None
  if process_index == 0 or simulated:
    extra = {"tokenizer": desc, "frame_rate": int(tokenizer.frame_rate), "record_format": records.FORMAT_VERSION,
             "filters": {"min_duration": cfg.min_duration, "max_duration": cfg.max_duration,
                         "min_dnsmos": cfg.min_dnsmos, "silence_threshold_db": cfg.silence_threshold_db},
             "input": os.path.abspath(input_path)}
    merged = manifest_lib.merge(output_dir, names, extra)
    if merged["complete"]:
      manifest_lib.write(output_dir, merged)
      manifest = merged
      log(f"tokenize: manifest: {merged['utterances']} utterances, {merged['hours']:.3f} h, "
          f"{merged['skipped_count']} skipped")
  return JobResult(written, [names[u.index] for u in done], utterances, seconds,
                   ssl_runner.seconds + (acoustic_runner.seconds if acoustic_runner else 0.0), manifest)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  cfg = f.config.data
  pi, pc = f.process_index, f.process_count
  # The command wires the model-backed tokenizers in; the job itself imports no model.
  from metis_jax.frontend import tokenizers  # pylint: disable=g-import-not-at-top
  run(cfg, f.input, f.output, tokenizer=tokenizers.load_tokenizer(cfg.tokenizer_dir),
      acoustic_tokenizer=tokenizers.acoustic_tokenizer_from_config(cfg), record_sources=f.record_sources,
      process_index=pi if pi >= 0 else None, process_count=pc if pc > 0 else None)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("input", None, "Corpus root (folder or tar).", required=True)
  flags.DEFINE_string("output", None, "Output folder of shards and manifest.", required=True)
  flags.DEFINE_integer("process_index", -1, "Override jax.process_index() (manual sharding of the job).")
  flags.DEFINE_integer("process_count", 0, "Override jax.process_count() (with --process_index).")
  flags.DEFINE_bool("record_sources", False, "Records name their source audio file (relative to --input), "
                    "which the fine-tuning task pipelines read audio from (directory layouts).")
  from metis_jax.parallel import compilation_cache  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("compilation_cache_dir", None, compilation_cache.FLAG_HELP)
  flags.mark_flag_as_required("config")
  from metis_jax import cli_support  # pylint: disable=g-import-not-at-top

  def main_with_summary(argv):
    """`main`, then one line: the manifest, the count, the first skipped files and why."""
    del argv
    f = flags.FLAGS
    from metis_jax.frontend import tokenizers  # pylint: disable=g-import-not-at-top
    if not os.path.exists(f.input):
      raise cli_support.UserError(f"--input {f.input} does not exist; give a corpus folder or tar")
    compilation_cache.enable(f.compilation_cache_dir)
    pi, pc = f.process_index, f.process_count
    result = run(f.config.data, f.input, f.output, tokenizer=tokenizers.load_tokenizer(f.config.data.tokenizer_dir),
                 acoustic_tokenizer=tokenizers.acoustic_tokenizer_from_config(f.config.data),
                 record_sources=f.record_sources, process_index=pi if pi >= 0 else None,
                 process_count=pc if pc > 0 else None)
    m = result.manifest
    if m is None:
      print(f"done: wrote {len(result.written)} shards to {f.output}; process 0 writes the manifest "
            "once every process has finished")
      return
    skipped = "; ".join(f"{os.path.basename(s['file'])}: {s['reason']}" for s in m["skipped"][:3])
    print(f"done: {os.path.join(f.output, manifest_lib.MANIFEST_NAME)}: "
          f"{m['utterances']} utterances, {m['hours']:.3f} h; {m['skipped_count']} skipped"
          f"{f' (first: {skipped})' if skipped else ''}. "
          f"Next: train on it with --config.data.train_sources='(\"{f.output}\",)'")

  cli_support.run(lambda: app.run(main_with_summary))
