"""The default job's data: the espeak-ng demo corpus, a k-means tokenizer and token shards.

`prepare(directory, data_cfg)` builds, under `directory`:
  corpus/     the synthesized speech (wav + txt), see `demo_corpus`
  tokenizer/  a k-means SSL tokenizer fitted on it (`fit_kmeans`)
  shards/     ArrayRecord token shards and a manifest (`tokenize`)
and returns the shard folder. Every stage is skipped when its output is
complete, so a resumed run (or several runs sharing a folder) reuses them.
Only JAX process 0 builds; the others wait for the manifest.
"""

import os
import sys
import time

import jax

from metis_jax.data import demo_corpus, fit_kmeans, tokenize

DONE = ".complete"


def _complete(path: str) -> bool:
  return os.path.exists(os.path.join(path, DONE))


def _mark(path: str) -> None:
  with open(os.path.join(path, DONE), "w") as f:
    f.write("ok\n")


def prepare(directory: str, data_cfg, log=lambda s: print(s, file=sys.stderr),
            timeout_s: float = 1800.0) -> str:
  """Builds (or reuses) the demo corpus, tokenizer and shards; returns the shard folder.

  Args:
    directory: folder to build in.
    data_cfg: `config.data`; its `kmeans_clusters` sets the vocabulary (it
      must equal `config.model.vocab_size`).
    log: progress messages.
    timeout_s: how long non-zero processes wait for process 0.
  """
  corpus, tokenizer_dir, shards = (os.path.join(directory, d) for d in ("corpus", "tokenizer", "shards"))
  if jax.process_index() != 0:
    deadline = time.time() + timeout_s
    while not _complete(shards):
      if time.time() > deadline:
        raise TimeoutError(f"process 0 did not finish the demo shards in {shards} within {timeout_s:.0f} s")
      time.sleep(1.0)
    return shards
  if not _complete(corpus):
    info = demo_corpus.generate(corpus)
    log(f"demo data: synthesized {info['files']} utterances ({info['seconds'] / 60:.1f} min) in {corpus}")
    _mark(corpus)
  if not _complete(tokenizer_dir):
    fit_kmeans.fit_tokenizer(data_cfg, corpus, tokenizer_dir, log=log)
    _mark(tokenizer_dir)
  if not _complete(shards):
    cfg = data_cfg.copy_and_resolve_references()
    cfg.tokenizer_dir = tokenizer_dir
    result = tokenize.run(cfg, corpus, shards, process_index=0, process_count=1, log=log)
    if result.manifest is None:
      raise RuntimeError(f"tokenizing the demo corpus into {shards} did not complete")
    _mark(shards)
  return shards
