"""Data benchmark: input-pipeline and tokenization throughput on this host.

Run:  python benchmarks/data.py [--seconds 8] [--records 3000]

Prints one table:
  * the Grain training pipeline (ArrayRecord -> shuffle -> decode -> crop ->
    scheduled length buckets -> global jax.Array, data.batches) with 0 and 2
    worker processes:
    records/s and audio-hours/s per host, padding efficiency, time to the
    first batch; the target is ~200 records/s per host (the margin is printed);
  * the tokenization job with the k-means tokenizer (k = 1024) on the
    espeak-ng demo corpus: audio hours per device-hour (time on the device
    only) and per wall-hour of the whole job (decode + resample + write).
Synthetic token shards mimic Metis data: 3-30 s utterances (150-1500 tokens).
Takes under a minute on a 2-core CPU machine.
"""

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_RECORDS_PER_SECOND = 200.0


def bench_pipeline(shard_dir: str, workers: int, seconds: float, batch: int, seq: int) -> dict:
  """Steady-state throughput of make_train_iterator with global arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metis_jax import config_base  # pylint: disable=g-import-not-at-top
  from metis_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from metis_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  config = config_base.get_config()
  config.train.global_batch_size = batch
  config.train.seq_length = seq
  config.data.train_sources = (shard_dir,)
  config.data.num_workers = workers
  config.data.min_length = 50
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(config, mesh_lib.batch_sharding(mesh))
  first = next(it)
  jax.block_until_ready(first)
  startup = time.perf_counter() - t0
  records = tokens = slots = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    valid = np.asarray(b["valid"])
    records += int(valid.any(axis=1).sum())
    tokens += int(valid.sum())
    slots += valid.size
  elapsed = time.perf_counter() - t0
  it.close()
  del it
  gc.collect()
  return {"records_per_s": records / elapsed, "hours_per_s": tokens / 50 / 3600 / elapsed,
          "efficiency": tokens / slots, "startup_s": startup}


def bench_tokenize(workdir: str) -> dict:
  """k-means tokenization job on the demo corpus; second run (compiled) timed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from metis_jax import config_base  # pylint: disable=g-import-not-at-top
  from metis_jax.data import demo_corpus  # pylint: disable=g-import-not-at-top
  from metis_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  from metis_jax.data import tokenizer as tk  # pylint: disable=g-import-not-at-top
  corpus = os.path.join(workdir, "demo")
  demo_corpus.generate(corpus, speakers_per_language=4)
  tok = tk.KMeansTokenizer(np.random.default_rng(0).standard_normal((1024, tk.FEATURE_DIM)).astype(np.float32))
  cfg = config_base.data_config()
  cfg.files_per_shard = 64
  results = []
  for run in range(2):
    out = os.path.join(workdir, f"tokens{run}")
    t0 = time.perf_counter()
    res = tokenize.run(cfg, corpus, out, tokenizer=tok, log=lambda s: None)
    results.append((res, time.perf_counter() - t0))
  res, wall = results[1]
  return {"audio_s": res.audio_seconds, "device_s": res.tokenize_seconds, "wall_s": wall,
          "first_wall_s": results[0][1], "utterances": res.utterances}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seconds", type=float, default=8.0, help="measurement time per pipeline setting")
  parser.add_argument("--records", type=int, default=3000, help="synthetic records")
  parser.add_argument("--batch", type=int, default=32, help="global batch size")
  parser.add_argument("--seq", type=int, default=1024, help="crop length (train.seq_length)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from metis_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix="metis_data_bench_")
  try:
    shard_dir = os.path.join(workdir, "shards")
    synthetic.write_token_shards(shard_dir, args.records, 8, min_tokens=150, max_tokens=1500, vocab_size=8192)
    rows = []
    for workers in (0, 2):
      r = bench_pipeline(shard_dir, workers, args.seconds, args.batch, args.seq)
      rows.append((f"pipeline, {workers} workers", r))
    tok = bench_tokenize(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  device = jax.devices()[0]
  print(f"\nmetis_jax data benchmark on {os.cpu_count()} CPU cores, device {device.platform}:{device.device_kind} "
        f"x{jax.device_count()}; batch {args.batch} x {args.seq} tokens, records of 3-30 s\n")
  print(f"| {'setting':<22} | {'records/s/host':>14} | {'audio h/s/host':>14} | {'padding eff.':>12} | "
        f"{'1st batch s':>11} | {'vs 200 rec/s':>12} |")
  print(f"|{'-' * 24}|{'-' * 16}|{'-' * 16}|{'-' * 14}|{'-' * 13}|{'-' * 14}|")
  for name, r in rows:
    margin = r["records_per_s"] / TARGET_RECORDS_PER_SECOND
    print(f"| {name:<22} | {r['records_per_s']:>14.0f} | {r['hours_per_s']:>14.3f} | {r['efficiency']:>12.3f} | "
          f"{r['startup_s']:>11.2f} | {margin:>11.1f}x |")
  per_device_hour = tok["audio_s"] / tok["device_s"]
  per_wall_hour = tok["audio_s"] / tok["wall_s"]
  print(f"\n| {'tokenization (k-means, k=1024)':<34} | {'value':>12} |")
  print(f"|{'-' * 36}|{'-' * 14}|")
  print(f"| {'audio hours per device-hour':<34} | {per_device_hour:>12.0f} |")
  print(f"| {'audio hours per wall-hour (job)':<34} | {per_wall_hour:>12.0f} |")
  print(f"| {'corpus (utterances / minutes)':<34} | {tok['utterances']:>5} / {tok['audio_s'] / 60:>4.1f} |")
  print(f"| {'first run incl. compile (s)':<34} | {tok['first_wall_s']:>12.1f} |")
  print(f"\nTarget: ~{TARGET_RECORDS_PER_SECOND:.0f} records/s per host; the pipeline is "
        f"{min(r['records_per_s'] for _, r in rows) / TARGET_RECORDS_PER_SECOND:.1f}x that at worst.")


if __name__ == "__main__":
  main()
