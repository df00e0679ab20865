"""The default job: every part the `continue` task needs, trained on one demo corpus.

`run_demo_job(workdir, stage1_config)` trains, all on `<workdir>/demo_data`
(one corpus, one k-means SSL tokenizer, one residual k-means acoustic
tokenizer; `metis_jax.data.demo`):
  <workdir>/                 stage 1 (the given config, e.g. configs/tiny.py)
  <workdir>/s2a_1layer/      S2A for acoustic layer 0 (configs/s2a_tiny_1layer.py)
  <workdir>/s2a_full/        S2A for layers 1..11 (configs/s2a_tiny.py)
and writes `lineage.json` into each (the fingerprints of the tokenizers it
was trained on) and `<workdir>/decode_bundle.json`, which names the parts
(relative paths: the workdir can move) and their fingerprints; the renderer
is Griffin-Lim over the acoustic tokenizer's mel (`inference.mel_renderer`,
nothing to train). `inference.demo_bundle.load_bundle(workdir)` reads it.
"""

import json
import os
import time
from typing import Callable, Optional

import ml_collections

from metis_jax import config_lib
from metis_jax.data import demo, fingerprint

BUNDLE_NAME = "decode_bundle.json"
BUNDLE_VERSION = 1
S2A_CONFIGS = (("s2a_1layer", "s2a_tiny_1layer.py"), ("s2a_full", "s2a_tiny.py"))
RENDERER = {"type": "griffin_lim_mel", "iterations": 48, "momentum": 0.99, "nnls_iterations": 30, "seed": 0}


def configs_dir() -> str:
  """The repository's `configs/` folder (beside the package)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def load_config(filename: str) -> ml_collections.ConfigDict:
  """`get_config()` of `configs/<filename>`."""
  path = os.path.join(configs_dir(), filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"error: {path}: config not found (the demo job needs the repository's configs/)")
  return config_lib.load_config(path)


def is_demo_stage1(config: ml_collections.ConfigDict) -> bool:
  """Whether a config is a stage-1 run on the demo corpus (what the demo job completes)."""
  return (config.model.get("kind", "metis") == "metis" and bool(config.data.demo_corpus)
          and not config.data.train_sources and not config.train.synthetic_data)


def _with(config: ml_collections.ConfigDict, steps: Optional[int], sources=None) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if steps is not None:
      config.train.steps = int(steps)
      config.train.warmup_steps = min(config.train.warmup_steps, max(1, int(steps) // 10))
      config.checkpoint.every_steps = max(1, min(config.checkpoint.every_steps, int(steps)))
    if sources is not None:
      config.data.train_sources = tuple(sources)
  return config


def run_demo_job(workdir: str, stage1_config: ml_collections.ConfigDict, *, train_stage1: bool = True,
                 stage1_steps: Optional[int] = None, s2a_steps: Optional[dict] = None,
                 log: Callable[[str], None] = lambda s: print(s, flush=True),
                 train: Callable) -> dict:
  """Trains stage 1 and both S2A models on the demo; writes lineage and `decode_bundle.json`.

  Args:
    workdir: the run folder (stage 1 trains in it, the S2A models in sub-folders).
    stage1_config: a demo stage-1 config (`is_demo_stage1`), e.g. configs/tiny.py.
    train_stage1: False when the caller trains stage 1 itself (then call this after it).
    stage1_steps: overrides `stage1_config.train.steps`.
    s2a_steps: {'s2a_1layer': n, 's2a_full': n} overrides the S2A configs' steps.
    log: progress lines.
    train: `train(config, workdir)`, the training loop's entry (`loop.train`; passed in so that
      this module and the loop do not import each other).

  Returns:
    the bundle (what `decode_bundle.json` holds), plus 'seconds' per part.
  """
  s2a_steps = dict(s2a_steps or {})
  if not is_demo_stage1(stage1_config):
    raise ValueError("error: the demo job needs a stage-1 config on the demo corpus (data.demo_corpus=True, "
                     "no data.train_sources), e.g. configs/tiny.py")
  data_dir = os.path.join(workdir, "demo_data")
  seconds = {}
  stage1_config = _with(stage1_config, stage1_steps)
  shards = demo.prepare(data_dir, stage1_config.data, log=log)
  if train_stage1:
    t0 = time.perf_counter()
    log(f"demo job: stage 1 ({stage1_config.train.steps} steps) in {workdir}")
    train(stage1_config, workdir)
    seconds["stage1"] = time.perf_counter() - t0
  fingerprint.write_lineage(workdir, fingerprint.read_lineage(shards))
  parts = {"stage1": "."}
  acoustic_tok = None
  for name, filename in S2A_CONFIGS:
    cfg = load_config(filename)
    if cfg.data.kmeans_clusters != stage1_config.data.kmeans_clusters:
      raise ValueError(f"error: configs/{filename}: data.kmeans_clusters {cfg.data.kmeans_clusters} differs from "
                       f"the stage-1 config's {stage1_config.data.kmeans_clusters}; they must share the tokenizer")
    with cfg.unlocked():  # the stage-1 recipe (frames, iterations, seed) so the folder is shared
      for key in ("kmeans_iterations", "kmeans_max_frames", "seed"):
        cfg.data[key] = stage1_config.data[key]
    train_dir = demo.prepare(data_dir, cfg.data, log=log, acoustic_codebook_size=cfg.model.vocab_size)
    acoustic_tok = demo.acoustic_tokenizer_dir(data_dir, cfg.model.vocab_size)
    cfg = _with(cfg, s2a_steps.get(name), (train_dir,))
    sub = os.path.join(workdir, name)
    t0 = time.perf_counter()
    log(f"demo job: {name} ({cfg.train.steps} steps) in {sub}")
    train(cfg, sub)
    seconds[name] = time.perf_counter() - t0
    fingerprint.write_lineage(sub, fingerprint.read_lineage(train_dir))
    parts[name] = name
  ssl_tok = demo.tokenizer_dir(data_dir)
  bundle = {
      "version": BUNDLE_VERSION,
      "parts": dict(parts, ssl_tokenizer=os.path.relpath(ssl_tok, workdir),
                    acoustic_tokenizer=os.path.relpath(acoustic_tok, workdir)),
      "renderer": dict(RENDERER),
      "fingerprints": {"ssl_tokenizer": fingerprint.fingerprint(ssl_tok),
                       "acoustic_tokenizer": fingerprint.fingerprint(acoustic_tok)},
      "demo_data": demo.fingerprints(data_dir),
  }
  path = os.path.join(workdir, BUNDLE_NAME)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(bundle, f, indent=1)
  os.replace(path + ".tmp", path)
  log(f"demo job: wrote {path}; continue a prompt with:\n  python -m metis_jax.decode --task continue "
      f"--model {workdir} --prompt_wav {os.path.join(data_dir, 'corpus', 'en', 'en_m1', 'en_m1_007.wav')} "
      "--target_seconds 3 --out continued.wav")
  return dict(bundle, seconds=seconds)
