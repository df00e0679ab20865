"""Raw-audio training crops for the codecs: a Grain pipeline with checkpointable state.

Per host (JAX process), with the Grain Dataset API and the shared chain of
`data.batches` (the token pipeline's too):

  audio files of each corpus (folders walked in sorted order) or ArrayRecord
  shards whose records are encoded audio files
    -> batches.source_chain          shuffle(seed) per corpus, repeat(num_epochs)
                                     (0 = forever), mix(weights),
                                     [process_index::process_count]
    -> decode, down-mix, resample to the codec's rate, random crop
                                     (a file that fails becomes an error element)
    -> batches.host_iter_dataset     to_iter_dataset -> mp_prefetch(num_workers)
    -> CropBatchIterator             drops and counts error elements, stacks batches

Batch (host numpy; `batches.GlobalBatchIterator` makes global arrays):
  wav      float32 [batch, samples]   a crop at a random offset, zero after its length
  lengths  int32   [batch]            real samples per row (< samples for short files)

Skipped files (undecodable, empty, non-finite or silent) are logged (the
first few with their reason) and counted in the iterator state
(`skipped_files`), so the count survives a resume. Each crop decodes its
whole file: fine for utterance-length files (Emilia's 3-30 s).

Checkpointing: `get_state()` is a JSON-able dict (the Grain parent's state
and the skip count); a restored iterator yields exactly the batches the
uninterrupted one would have (same sources, seeds and worker count).
"""

import os
import sys
import time
from typing import Any, Optional, Sequence

import grain
import numpy as np
from absl import logging

from metis_jax.data import audio
from metis_jax.data import batches
from metis_jax.data import shards

_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)
# Skipped files logged one by one; after that every LOG_EVERY-th.
LOG_FIRST, LOG_EVERY = 10, 100
AUDIO_SHARD_PREFIX = "audio"
DONE = ".complete"


# ---------------------------------------------------------------------------
# Sources.


def _walk_audio(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if audio.is_supported(f))
  return out


def is_shard_source(spec: str) -> bool:
  """Whether `spec` names ArrayRecord shards (a file, a glob, or a folder holding some)."""
  if spec.endswith(shards.SHARD_SUFFIX):
    return True
  return os.path.isdir(spec) and any(f.endswith(shards.SHARD_SUFFIX) for f in os.listdir(spec))


def open_source(spec: str):
  """A random-access source of one corpus: a list of file paths, or ArrayRecord records (bytes).

  Args:
    spec: a folder of audio files (walked recursively), one audio file, a glob
      of audio files, or ArrayRecord shards of encoded audio files (see
      `write_audio_shards`).

  Raises:
    FileNotFoundError: nothing usable matches.
  """
  if is_shard_source(spec):
    return grain.sources.ArrayRecordDataSource(shards.list_shards(spec))
  if os.path.isdir(spec):
    files = _walk_audio(spec)
  elif any(c in spec for c in "*?["):
    import glob  # pylint: disable=import-outside-toplevel
    files = sorted(p for p in glob.glob(spec) if audio.is_supported(p))
  else:
    files = [spec] if os.path.isfile(spec) else []
  if not files:
    raise FileNotFoundError(f"no audio files ({', '.join(audio.SUPPORTED_EXTENSIONS)}) at {spec!r}")
  return files


def write_audio_shards(files: Sequence[str], output_dir: str, files_per_shard: int = 256) -> list[str]:
  """Packs encoded audio files (their bytes, unchanged) into ArrayRecord shards.

  Returns:
    The shard paths (`audio-00000-of-00002.array_record`, ...).
  """
  os.makedirs(output_dir, exist_ok=True)
  groups = [files[i:i + files_per_shard] for i in range(0, len(files), files_per_shard)]
  paths = []
  for i, group in enumerate(groups):
    path = os.path.join(output_dir, shards.shard_name(i, len(groups), AUDIO_SHARD_PREFIX))

    def read(group=group):
      for f in group:
        with open(f, "rb") as fh:
          yield fh.read()

    shards.write_shard(path, read())
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------
# Per-element transform (runs in the Grain worker processes).


def random_crop(samples: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
  """`[n]` -> (`[crop]` float32 at a random offset, zero-padded if n < crop; real length)."""
  out = np.zeros((crop,), np.float32)
  n = len(samples)
  if n <= crop:
    out[:n] = samples
    return out, n
  start = int(rng.integers(0, n - crop + 1))
  out[:] = samples[start:start + crop]
  return out, crop


class LoadCrop(grain.transforms.RandomMap):
  """Path or encoded bytes -> {'wav': float32 [crop], 'length': int, 'error': ''}.

  A file that cannot be used gives {'wav': float32 [0], 'length': 0, 'error': reason}.
  """

  def __init__(self, sample_rate: int, crop: int, silence_threshold_db: float = -60.0):
    self.sample_rate = sample_rate
    self.crop = crop
    self.silence_threshold_db = silence_threshold_db

  def random_map(self, element, rng: np.random.Generator):
    name = element if isinstance(element, str) else "<audio record>"
    try:
      waves, _ = audio.load(element, (self.sample_rate,), name=name,
                            silence_threshold_db=self.silence_threshold_db)
    except (audio.AudioError, OSError, ValueError, RuntimeError) as e:
      return {"wav": np.zeros((0,), np.float32), "length": 0, "error": str(e) or type(e).__name__}
    wav, length = random_crop(waves[self.sample_rate], self.crop, rng)
    return {"wav": wav, "length": length, "error": ""}


def element_dataset(sources: Sequence[str], weights: Sequence[float] = (), *, sample_rate: int, crop: int,
                    seed: int = 0, num_epochs: int = 0, process_index: int = 0, process_count: int = 1,
                    silence_threshold_db: float = -60.0) -> grain.MapDataset:
  """The per-host dataset of crops (and error elements), before batching; see the module doc."""
  if not sources:
    raise ValueError("no audio sources: set config.data.train_sources (or data.demo_corpus=True)")
  ds = batches.source_chain([open_source(spec) for spec in sources], weights, seed=seed, num_epochs=num_epochs,
                            process_index=process_index, process_count=process_count)
  return ds.random_map(LoadCrop(sample_rate, crop, silence_threshold_db), seed=seed + 1)


# ---------------------------------------------------------------------------
# Batching with a count of skipped files.


class CropBatchIterDataset(grain.IterDataset):
  """Stacks `batch_size` good crops per batch, dropping (and counting) error elements."""

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self.batch_size = batch_size

  def __iter__(self) -> "CropBatchIterator":
    return CropBatchIterator(self._parent.__iter__(), self.batch_size)

  def __str__(self):
    return f"CropBatchIterDataset(batch_size={self.batch_size})"


class CropBatchIterator(grain.DatasetIterator):
  """Iterator of `CropBatchIterDataset`; state = the parent's state + `skipped_files`."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self.batch_size = batch_size
    self.skipped_files = 0

  def _skip(self, error: str) -> None:
    self.skipped_files += 1
    n = self.skipped_files
    if n <= LOG_FIRST or n % LOG_EVERY == 0:
      logging.warning("skipped audio file #%d: %s", n, error)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    wavs, lengths = [], []
    misses = 0
    while len(wavs) < self.batch_size:
      element = next(self._parent)
      if element["error"]:
        self._skip(element["error"])
        misses += 1
        if misses > 1000 and not wavs:
          raise RuntimeError(f"the last {misses} audio files could not be used; the latest: "
                             f"{element['error']}")
        continue
      wavs.append(element["wav"])
      lengths.append(element["length"])
    return {"wav": np.stack(wavs).astype(np.float32), "lengths": np.asarray(lengths, np.int32)}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped_files": self.skipped_files}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.skipped_files = int(state.get("skipped_files", 0))


def make_local_iterator(data_cfg, *, sample_rate: int, crop: int, batch_size: int, process_index: int = 0,
                        process_count: int = 1, num_workers: Optional[int] = None) -> CropBatchIterator:
  """This host's batches of crops (see the module doc for the format).

  Args:
    data_cfg: `config.data` (config_base.audio_data_config), with `train_sources` set.
    sample_rate: the codec's rate (files are resampled to it).
    crop: samples per crop.
    batch_size: rows per host batch (the global batch / process_count).
    process_index: this host.
    process_count: number of hosts.
    num_workers: override of data_cfg.num_workers.
  """
  ds = element_dataset(list(data_cfg.train_sources), list(data_cfg.train_weights), sample_rate=sample_rate,
                       crop=crop, seed=data_cfg.seed, num_epochs=data_cfg.num_epochs,
                       process_index=process_index, process_count=process_count,
                       silence_threshold_db=data_cfg.silence_threshold_db)
  workers = data_cfg.num_workers if num_workers is None else num_workers
  it_ds = batches.host_iter_dataset(ds, _READ_OPTIONS, workers, data_cfg.worker_buffer_size)
  return iter(CropBatchIterDataset(it_ds, batch_size))


# ---------------------------------------------------------------------------
# The demo corpus as codec training audio.


def prepare_demo_corpus(directory: str, log=lambda s: print(s, file=sys.stderr), process_index: int = 0,
                        timeout_s: float = 1800.0) -> str:
  """Synthesizes (or reuses) the espeak-ng demo corpus in `directory`; returns it.

  Process 0 builds it; the others wait for its completion marker.
  """
  done = os.path.join(directory, DONE)
  if process_index != 0:
    deadline = time.time() + timeout_s
    while not os.path.exists(done):
      if time.time() > deadline:
        raise TimeoutError(f"process 0 did not finish the demo corpus in {directory} within {timeout_s:.0f} s")
      time.sleep(1.0)
    return directory
  if not os.path.exists(done):
    from metis_jax.data import demo_corpus  # pylint: disable=import-outside-toplevel
    info = demo_corpus.generate(directory)
    log(f"demo data: synthesized {info['files']} utterances ({info['seconds'] / 60:.1f} min) in {directory}")
    with open(done, "w") as f:
      f.write("ok\n")
  return directory
