"""The default job's data: the espeak-ng demo corpus, a k-means tokenizer and token shards.

`prepare(directory, data_cfg)` builds, under `directory`:
  corpus/     the synthesized speech (wav + txt), see `demo_corpus`
  tokenizer/  a k-means SSL tokenizer fitted on it (`fit_kmeans`)
  shards/     ArrayRecord token shards and a manifest (`tokenize`)
and returns the shard folder. Every stage is skipped when its output is
complete, so a resumed run (or several runs sharing a folder) reuses them.
Only JAX process 0 builds; the others wait for the manifest.

For S2A (`prepare(..., acoustic_codebook_size=C)`) the records also carry
acoustic tokens [T, 12], under `acoustic_c<C>/`:
  tokenizer/  the acoustic tokenizer, fitted on the corpus
  all/        SSL + acoustic token shards of the whole corpus
  train/      every utterance but the held-out ones (what training reads)
  heldout/    the last sentence of every voice (`is_heldout`): 12 of the 96
              utterances, seen voices saying unseen sentences
The acoustic tokens are *not* those of the released neural codec (no codec
weights are available offline). They come from
`acoustic_kmeans.ResidualKMeansAcousticTokenizer`: a 12-layer residual
k-means of 24 kHz log-mel frames on the codec's frame grid (50 Hz, N // 480
frames), fitted here, deterministic for a given corpus and seed. Like codec
tokens, coarse layers hold the spectral envelope and finer layers residual
detail; unlike them, they do not decode back to a waveform. (The tiny codec
at a random initialization was tried and rejected: its residual VQ then
makes every layer above 0 a function of layer 0, so there would be nothing
to learn.) Both tokenizers are fitted (unsupervised) on the whole corpus;
the S2A model never sees the held-out utterances.
"""

import os
import sys
import time

import jax

from metis_jax.data import acoustic_kmeans, demo_corpus, fit_kmeans, records, shards, tokenize

DONE = ".complete"
ACOUSTIC_LAYERS = 12
# Utterances `<speaker>_007` (the last of the 8 sentences of each voice) are held out.
HELDOUT_SUFFIX = "_007"


def _complete(path: str) -> bool:
  return os.path.exists(os.path.join(path, DONE))


def _mark(path: str) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, DONE), "w") as f:
    f.write("ok\n")


def is_heldout(record_id: str) -> bool:
  """Whether a demo utterance is held out of S2A training (the last sentence of each voice)."""
  return record_id.endswith(HELDOUT_SUFFIX)


def acoustic_dir(directory: str, codebook_size: int) -> str:
  """Folder of the demo's acoustic shards for a codebook size (its train/ and heldout/ inside)."""
  return os.path.join(directory, f"acoustic_c{codebook_size}")


def split_heldout(source: str, train_dir: str, heldout_dir: str) -> tuple[int, int]:
  """Copies the records of `source` into `train_dir` and `heldout_dir` by `is_heldout`.

  Returns:
    (train records, held-out records).
  """
  parts = {train_dir: [], heldout_dir: []}
  for raw in shards.read_all(shards.list_shards(source)):
    parts[heldout_dir if is_heldout(records.decode(raw)["id"]) else train_dir].append(raw)
  for folder, recs in parts.items():
    if not recs:
      raise RuntimeError(f"splitting {source}: no records for {folder}")
    os.makedirs(folder, exist_ok=True)
    shards.write_shard(os.path.join(folder, shards.shard_name(0, 1)), recs)
  return len(parts[train_dir]), len(parts[heldout_dir])


def _wait_for(path: str, timeout_s: float) -> None:
  deadline = time.time() + timeout_s
  while not _complete(path):
    if time.time() > deadline:
      raise TimeoutError(f"process 0 did not finish the demo shards in {path} within {timeout_s:.0f} s")
    time.sleep(1.0)


def _tokenize(data_cfg, corpus: str, tokenizer_dir: str, out: str, log, acoustic=None) -> None:
  cfg = data_cfg.copy_and_resolve_references()
  cfg.tokenizer_dir = tokenizer_dir
  result = tokenize.run(cfg, corpus, out, acoustic_tokenizer=acoustic, process_index=0,
                        process_count=1, log=log)
  if result.manifest is None:
    raise RuntimeError(f"tokenizing the demo corpus into {out} did not complete")


def prepare(directory: str, data_cfg, log=lambda s: print(s, file=sys.stderr),
            timeout_s: float = 1800.0, acoustic_codebook_size: int = 0) -> str:
  """Builds (or reuses) the demo corpus, tokenizer and shards; returns the shard folder.

  Args:
    directory: folder to build in.
    data_cfg: `config.data`; its `kmeans_clusters` sets the SSL vocabulary
      (it must equal the model's SSL vocabulary).
    log: progress messages.
    timeout_s: how long non-zero processes wait for process 0.
    acoustic_codebook_size: > 0 for S2A: records also carry the demo's
      acoustic tokens with this codebook size, and the returned folder is
      the training part (`acoustic_dir(directory, C)/train`).
  """
  corpus, tokenizer_dir, ssl_shards = (os.path.join(directory, d) for d in ("corpus", "tokenizer", "shards"))
  root = acoustic_dir(directory, acoustic_codebook_size) if acoustic_codebook_size else None
  result = os.path.join(root, "train") if root else ssl_shards
  if jax.process_index() != 0:
    _wait_for(root or ssl_shards, timeout_s)
    return result
  if not _complete(corpus):
    info = demo_corpus.generate(corpus)
    log(f"demo data: synthesized {info['files']} utterances ({info['seconds'] / 60:.1f} min) in {corpus}")
    _mark(corpus)
  if not _complete(tokenizer_dir):
    fit_kmeans.fit_tokenizer(data_cfg, corpus, tokenizer_dir, log=log)
    _mark(tokenizer_dir)
  if root is None:
    if not _complete(ssl_shards):
      _tokenize(data_cfg, corpus, tokenizer_dir, ssl_shards, log)
      _mark(ssl_shards)
    return ssl_shards
  if not _complete(root):
    acoustic = acoustic_kmeans.fit_tokenizer(data_cfg, corpus, os.path.join(root, "tokenizer"),
                                             ACOUSTIC_LAYERS, acoustic_codebook_size, log=log)
    everything = os.path.join(root, "all")
    _tokenize(data_cfg, corpus, tokenizer_dir, everything, log, acoustic=acoustic)
    train, heldout = split_heldout(everything, result, os.path.join(root, "heldout"))
    log(f"demo data: acoustic tokens ({ACOUSTIC_LAYERS} x {acoustic_codebook_size} residual k-means) in "
        f"{root}: {train} training and {heldout} held-out utterances")
    _mark(root)
  return result


def heldout_dir(directory: str, codebook_size: int) -> str:
  """The held-out shard folder of `prepare(directory, ..., acoustic_codebook_size=C)`."""
  return os.path.join(acoustic_dir(directory, codebook_size), "heldout")

