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

Every demo config shares one folder (`<workdir>/demo_data`): `recipe.json`
records the settings that shape its contents (corpus, k-means sizes,
iterations, frames, seed, the espeak-ng build); a config whose recipe
differs is refused with one line rather than silently trained on another
tokenizer. The build is deterministic (`demo_corpus` synthesizes in a fresh
process; the k-means fits are seeded and read files in sorted order), and
`fingerprints.json` records the content fingerprints (`fingerprint`) of the
corpus, the tokenizers and the shards; every shard folder carries a
`lineage.json` naming the tokenizers that made it, which training copies
into its workdir.

For fine-tuning tasks (`prepare_tasks(directory, data_cfg)`), under `tasks/`:
  shards/      SSL token shards whose records name their audio file ('src')
               and carry phones (en, de, fr through `frontend.g2p`; the
               Spanish voices have none, the TTS task leaves them out)
  phone_vocab.json  the phone symbols of the corpus -> ids (built from it)
  noise/, rir/ synthetic noise (coloured, hum, babble of demo utterances)
               and room responses (`noise.make_demo_noise`)
  visual/      stand-in 25 fps visual features for L2S, one `.npy` per corpus
               wav at its relative path (`condition_features.
               synthetic_visual_features`); pass it as the L2S `visual_dir`
               (corpus/ itself is left untouched)
"""

import hashlib
import json
import os
import sys
import time

import jax

from metis_jax.data import acoustic_kmeans, demo_corpus, fingerprint, fit_kmeans, records, shards, tokenize

DONE = ".complete"
RECIPE_NAME = "recipe.json"
FINGERPRINTS_NAME = "fingerprints.json"
RECIPE_VERSION = 1
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


def recipe(data_cfg) -> dict:
  """The settings that decide the demo folder's SSL contents (`recipe.json`)."""
  return {"version": RECIPE_VERSION, "engine": demo_corpus.engine_version(),
          "corpus": {"languages": sorted(demo_corpus.SENTENCES), "speakers_per_language": 3,
                     "sentences_per_speaker": 8},
          "kmeans": {"clusters": int(data_cfg.kmeans_clusters), "iterations": int(data_cfg.kmeans_iterations),
                     "max_frames": int(data_cfg.kmeans_max_frames), "seed": int(data_cfg.seed)}}


def _check_recipe(directory: str, data_cfg) -> None:
  """Writes `recipe.json`, or refuses a folder built with other settings (one line)."""
  want = recipe(data_cfg)
  path = os.path.join(directory, RECIPE_NAME)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      have = json.load(f)
    if have != want:
      diff = [f"{k}: {have.get(k)} != {want[k]}" for k in want if have.get(k) != want[k]]
      raise ValueError(f"error: {directory} holds demo data built with other settings ({'; '.join(diff)}); "
                       "use another --workdir or delete that folder")
    return
  os.makedirs(directory, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(want, f, indent=1)


def shards_fingerprint(folder: str) -> str:
  """Fingerprint of a shard folder's records (their bytes, in shard order; not the manifest)."""
  h = hashlib.sha256()
  for raw in shards.read_all(shards.list_shards(folder)):
    h.update(len(raw).to_bytes(8, "little"))
    h.update(raw)
  return "sha256:" + h.hexdigest()[:16]


def _record_fingerprints(directory: str, **entries) -> dict:
  """Merges `entries` into `<directory>/fingerprints.json`; returns the whole record."""
  path = os.path.join(directory, FINGERPRINTS_NAME)
  have = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      have = json.load(f)
  have.update(entries)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(have, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return have


def fingerprints(directory: str) -> dict:
  """What `prepare` recorded in `<directory>/fingerprints.json` ({} before it ran)."""
  path = os.path.join(directory, FINGERPRINTS_NAME)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def tokenizer_dir(directory: str) -> str:
  """The demo's k-means SSL tokenizer folder."""
  return os.path.join(directory, "tokenizer")


def acoustic_tokenizer_dir(directory: str, codebook_size: int) -> str:
  """The demo's residual k-means acoustic tokenizer folder for a codebook size."""
  return os.path.join(acoustic_dir(directory, codebook_size), "tokenizer")


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
  corpus, ssl_tokenizer, ssl_shards = (os.path.join(directory, d) for d in ("corpus", "tokenizer", "shards"))
  root = acoustic_dir(directory, acoustic_codebook_size) if acoustic_codebook_size else None
  result = os.path.join(root, "train") if root else ssl_shards
  if jax.process_index() != 0:
    _wait_for(root or ssl_shards, timeout_s)
    return result
  _check_recipe(directory, data_cfg)
  if not _complete(corpus):
    info = demo_corpus.generate(corpus)
    log(f"demo data: synthesized {info['files']} utterances ({info['seconds'] / 60:.1f} min) in {corpus}")
    _record_fingerprints(directory, corpus=fingerprint.folder_fingerprint(corpus))
    _mark(corpus)
  if not _complete(ssl_tokenizer):
    fit_kmeans.fit_tokenizer(data_cfg, corpus, ssl_tokenizer, log=log)
    _record_fingerprints(directory, ssl_tokenizer=fingerprint.fingerprint(ssl_tokenizer))
    _mark(ssl_tokenizer)
  ssl_lineage = {"ssl_tokenizer": fingerprint.lineage_entry(ssl_tokenizer)}
  if root is None:
    if not _complete(ssl_shards):
      _tokenize(data_cfg, corpus, ssl_tokenizer, ssl_shards, log)
      fingerprint.write_lineage(ssl_shards, ssl_lineage)
      _record_fingerprints(directory, shards=shards_fingerprint(ssl_shards))
      _mark(ssl_shards)
    return ssl_shards
  if not _complete(root):
    acoustic_tok = os.path.join(root, "tokenizer")
    acoustic = acoustic_kmeans.fit_tokenizer(data_cfg, corpus, acoustic_tok,
                                             ACOUSTIC_LAYERS, acoustic_codebook_size, log=log)
    everything = os.path.join(root, "all")
    _tokenize(data_cfg, corpus, ssl_tokenizer, everything, log, acoustic=acoustic)
    train, heldout = split_heldout(everything, result, os.path.join(root, "heldout"))
    lineage = dict(ssl_lineage, acoustic_tokenizer=fingerprint.lineage_entry(acoustic_tok))
    for folder in (everything, result, os.path.join(root, "heldout")):
      fingerprint.write_lineage(folder, lineage)
    _record_fingerprints(directory, **{os.path.basename(root): {
        "acoustic_tokenizer": lineage["acoustic_tokenizer"]["fingerprint"],
        "shards": shards_fingerprint(everything)}})
    log(f"demo data: acoustic tokens ({ACOUSTIC_LAYERS} x {acoustic_codebook_size} residual k-means) in "
        f"{root}: {train} training and {heldout} held-out utterances")
    _mark(root)
  return result


def tasks_dir(directory: str) -> str:
  """Folder of the demo's fine-tuning task data (see the module doc)."""
  return os.path.join(directory, "tasks")


def demo_phonemizer(corpus: str, vocab_path: str):
  """A `(text, language) -> phone ids or None` for the demo corpus, with a vocabulary built from it.

  Phones come from `frontend.g2p` (espeak-ng; en, de, fr); languages it does
  not cover give None. The vocabulary (sorted symbols -> 0..n-1) is written
  to `vocab_path` as {"vocab": {symbol: id}}.
  """
  import json  # pylint: disable=g-import-not-at-top
  from metis_jax.data import readers  # pylint: disable=g-import-not-at-top
  from metis_jax.frontend import g2p as g2p_lib  # pylint: disable=g-import-not-at-top  (espeak only, no model)
  texts = {(u.text, u.language) for u in readers.iter_corpus(corpus) if isinstance(u, readers.Utterance)}
  engine = g2p_lib.G2P({"_": 0})

  def phones_of(text, language):
    try:
      return engine.phonemize(text, language).split(g2p_lib.PHONE_SEP)
    except g2p_lib.G2PError:
      return None

  symbols = sorted({p for t, lang in texts for p in (phones_of(t, lang) or ()) if p})
  vocab = {p: i for i, p in enumerate(symbols)}
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump({"vocab": vocab}, f, ensure_ascii=False, indent=0)

  def phonemize(text, language):
    phones = phones_of(text, language)
    return None if phones is None else [vocab[p] for p in phones if p in vocab]

  return phonemize


def write_visual_features(corpus: str, output_dir: str) -> int:
  """Writes stand-in visual features (float32 [T25, 768]) for each corpus wav; returns the count.

  `corpus/a/b.wav` -> `output_dir/a/b.npy`.
  """
  from metis_jax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
  from metis_jax.data import condition_features  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  count = 0
  for dirpath, _, files in os.walk(corpus):
    for name in sorted(files):
      if name.endswith(".wav"):
        wav = audio_lib.load(os.path.join(dirpath, name), (audio_lib.SSL_SAMPLE_RATE,))[0][audio_lib.SSL_SAMPLE_RATE]
        target = os.path.join(output_dir, os.path.relpath(dirpath, corpus), name[:-4] + ".npy")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        np.save(target, condition_features.synthetic_visual_features(wav))
        count += 1
  return count


def prepare_tasks(directory: str, data_cfg, log=lambda s: print(s, file=sys.stderr),
                  timeout_s: float = 1800.0) -> dict:
  """Builds (or reuses) the demo's fine-tuning task data; see the module doc.

  Returns:
    {'shards': folder, 'noise': folder, 'rir': folder, 'phone_vocab': path,
     'corpus': folder, 'visual': folder (the L2S `visual_dir`)}.
  """
  corpus, ssl_tokenizer = os.path.join(directory, "corpus"), tokenizer_dir(directory)
  root = tasks_dir(directory)
  out = {"shards": os.path.join(root, "shards"), "noise": os.path.join(root, "noise"),
         "rir": os.path.join(root, "rir"), "phone_vocab": os.path.join(root, "phone_vocab.json"), "corpus": corpus,
         "visual": os.path.join(root, "visual")}
  if jax.process_index() != 0:
    _wait_for(root, timeout_s)
    return out
  if _complete(root):
    return out
  prepare(directory, data_cfg, log=log, timeout_s=timeout_s)  # The corpus and its tokenizer (reused if built).
  os.makedirs(root, exist_ok=True)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.tokenizer_dir = ssl_tokenizer
  result = tokenize.run(cfg, corpus, out["shards"], phonemizer=demo_phonemizer(corpus, out["phone_vocab"]),
                        record_sources=True, process_index=0, process_count=1, log=log)
  if result.manifest is None:
    raise RuntimeError(f"tokenizing the demo corpus into {out['shards']} did not complete")
  visual = write_visual_features(corpus, out["visual"])
  from metis_jax.data import noise  # pylint: disable=g-import-not-at-top
  made = noise.make_demo_noise(root, corpus)
  log(f"demo data: task shards in {out['shards']}, {visual} visual feature files, {len(made['noise'])} noise "
      f"clips and {len(made['rir'])} room responses in {root}")
  _mark(root)
  return out


def heldout_dir(directory: str, codebook_size: int) -> str:
  """The held-out shard folder of `prepare(directory, ..., acoustic_codebook_size=C)`."""
  return os.path.join(acoustic_dir(directory, codebook_size), "heldout")

