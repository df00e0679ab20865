"""Fits the k-means SSL tokenizer on a corpus of audio.

Run:
  python -m metis_jax.data.fit_kmeans --config configs/tiny.py \
      --input /data/corpus --output /data/kmeans_tokenizer \
      [--config.data.kmeans_clusters=1024]

Reads the corpus with the same readers and filters as the tokenization job,
computes the tokenizer's 160-dim 50 Hz log-mel features, samples at most
`kmeans_max_frames` of them, seeds k centroids with k-means++ (on a subsample)
and runs `kmeans_iterations` Lloyd steps in JAX. Empty clusters are re-seeded
with the points farthest from their centroid. Writes `tokenizer.json` +
`centroids.npz` (see `tokenizer.KMeansTokenizer`).
"""

import concurrent.futures
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.data import readers
from metis_jax.data import tokenize as tokenize_lib
from metis_jax.data import tokenizer as tokenizer_lib

_CHUNK = 8192  # Points per assignment chunk (bounds the [chunk, k] matrix).


def corpus_features(cfg, input_path: str, max_frames: int, seed: int = 0,
                    log: Callable[[str], None] = lambda s: None) -> np.ndarray:
  """Features of a corpus: float32 [frames, 160], at most `max_frames` (sampled)."""
  rate = tokenizer_lib.SAMPLE_RATE
  units = readers.plan_units(input_path, cfg.layout, cfg.files_per_shard)
  feats, total = [], 0
  with concurrent.futures.ThreadPoolExecutor(max(1, cfg.decode_threads)) as pool:
    for unit in units:
      decoded, skipped = tokenize_lib.decode_unit(unit, cfg, (rate,), pool)
      if skipped:
        log(f"fit_kmeans: {len(skipped)} files skipped in unit {unit.index}")
      waves = [d.waves[rate] for d in decoded]
      bucket = max(1, int(cfg.tokenize_bucket_seconds * rate))
      for idx, padded, rows in tokenize_lib.length_batches([len(w) for w in waves], bucket,
                                                          int(cfg.tokenize_batch_seconds * rate)):
        batch = np.zeros((rows, padded), np.float32)
        lens = np.zeros((rows,), np.int32)
        for r, i in enumerate(idx):
          batch[r, :len(waves[i])] = waves[i]
          lens[r] = len(waves[i])
        f, tl = tokenizer_lib.features_jit(batch, lens)
        f, tl = np.asarray(f), np.asarray(tl)
        for r in range(len(idx)):
          feats.append(f[r, :tl[r]])
          total += int(tl[r])
  if not feats:
    raise ValueError(f"no usable audio in {input_path!r}")
  x = np.concatenate(feats)
  if len(x) > max_frames:
    x = x[np.random.default_rng(seed).choice(len(x), max_frames, replace=False)]
  log(f"fit_kmeans: {total} frames ({total / tokenizer_lib.FRAME_RATE / 3600:.3f} h), using {len(x)}")
  return x


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding of k centroids from points x [n, d] (n >= k)."""
  n = len(x)
  centroids = np.empty((k, x.shape[1]), np.float32)
  centroids[0] = x[rng.integers(n)]
  d2 = np.sum((x - centroids[0]) ** 2, axis=1)
  for j in range(1, k):
    total = d2.sum()
    i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
    centroids[j] = x[i]
    d2 = np.minimum(d2, np.sum((x - centroids[j]) ** 2, axis=1))
  return centroids


@jax.jit
def _lloyd_stats(x, centroids):
  """Per-cluster sums and counts, inertia and per-point distances."""
  n = x.shape[0]
  chunk = min(n, _CHUNK)
  chunks = jnp.pad(x, ((0, (-n) % chunk), (0, 0))).reshape(-1, chunk, x.shape[1])
  ids, dist = jax.lax.map(lambda c: tokenizer_lib.nearest_centroid(c, centroids), chunks)
  ids, dist = ids.reshape(-1)[:n], dist.reshape(-1)[:n]
  k = centroids.shape[0]
  sums = jax.ops.segment_sum(x, ids, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), ids, num_segments=k)
  return sums, counts, jnp.sum(dist), dist


def fit(x: np.ndarray, k: int, iterations: int, seed: int = 0,
        log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, dict]:
  """Lloyd's k-means on x [n, d]; returns (centroids [k, d], fit info)."""
  if len(x) < k:
    raise ValueError(f"only {len(x)} feature frames for k={k} clusters: use more audio or lower "
                     "config.data.kmeans_clusters")
  rng = np.random.default_rng(seed)
  sub = x[rng.choice(len(x), min(len(x), 32 * k), replace=False)]
  centroids = kmeans_plus_plus(sub, k, rng)
  xd = jnp.asarray(x)
  inertia = float("nan")
  for it in range(iterations):
    sums, counts, inertia, dist = _lloyd_stats(xd, jnp.asarray(centroids))
    sums, counts = np.asarray(sums), np.asarray(counts)
    empty = np.flatnonzero(counts == 0)
    centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids).astype(np.float32)
    if len(empty):
      far = np.argsort(-np.asarray(dist))[:len(empty)]
      centroids[empty] = x[far]
    inertia = float(inertia) / len(x)
    log(f"fit_kmeans: iteration {it + 1}/{iterations}: mean squared distance {inertia:.4f}, "
        f"{len(empty)} empty clusters re-seeded")
  return centroids, {"frames": int(len(x)), "iterations": int(iterations), "mean_sq_distance": inertia,
                     "seed": int(seed)}


def fit_tokenizer(cfg, input_path: str, output_dir: Optional[str] = None, k: Optional[int] = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tokenizer_lib.KMeansTokenizer:
  """Fits a `KMeansTokenizer` on a corpus (and saves it if `output_dir`)."""
  k = k or cfg.kmeans_clusters
  x = corpus_features(cfg, input_path, cfg.kmeans_max_frames, cfg.seed, log)
  centroids, info = fit(x, k, cfg.kmeans_iterations, cfg.seed, log)
  info["corpus"] = input_path
  tok = tokenizer_lib.KMeansTokenizer(centroids, info)
  if output_dir:
    tok.save(output_dir)
    log(f"fit_kmeans: saved a {k}-cluster tokenizer to {output_dir}")
  return tok


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  fit_tokenizer(flags.FLAGS.config.data, flags.FLAGS.input, flags.FLAGS.output)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("input", None, "Corpus root (folder or tar).", required=True)
  flags.DEFINE_string("output", None, "Output folder of the tokenizer.", required=True)
  flags.mark_flag_as_required("config")
  from metis_jax import cli_support  # pylint: disable=g-import-not-at-top
  cli_support.run(lambda: app.run(main))
