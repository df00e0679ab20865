"""Loads what the default job trained (`<workdir>/decode_bundle.json`) for decoding.

`load_bundle(workdir)` returns the stage-1 model, both S2A models, the SSL
tokenizer and the Griffin-Lim mel renderer (in the acoustic codec's place),
after checking with `fingerprint.check_compatible` that every model was
trained on these very tokenizers. A bundle whose parts were swapped or
retrained apart fails with one line naming the part that does not belong.
"""

import dataclasses
import json
import os
from typing import Any, Optional

from metis_jax.data import fingerprint
from metis_jax.inference import mel_renderer, model_loading

BUNDLE_NAME = "decode_bundle.json"


@dataclasses.dataclass
class DemoBundle:
  """Everything `continue`/`resynth` need, loaded.

  Attributes:
    stage1, s2a_full, s2a_1layer: `model_loading.LoadedModel`.
    tokenizer: the k-means SSL tokenizer.
    renderer: `mel_renderer.MelRenderer` (the codec interface).
    paths: {part: absolute path}; fingerprints: {part: fingerprint}.
  """
  stage1: Any
  s2a_full: Any
  s2a_1layer: Any
  tokenizer: Any
  renderer: mel_renderer.MelRenderer
  paths: dict
  fingerprints: dict


def is_bundle(path: Optional[str]) -> bool:
  """Whether `path` is a workdir with a `decode_bundle.json`."""
  return bool(path) and os.path.isfile(os.path.join(path, BUNDLE_NAME))


def read_bundle(workdir: str) -> dict:
  """The bundle's JSON with its parts as absolute paths."""
  path = os.path.join(workdir, BUNDLE_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"error: {workdir}: no {BUNDLE_NAME} (train the default job: python -m metis_jax.train "
                            f"--config configs/tiny.py --workdir {workdir})")
  with open(path, encoding="utf-8") as f:
    bundle = json.load(f)
  need = ("stage1", "s2a_1layer", "s2a_full", "ssl_tokenizer", "acoustic_tokenizer")
  lost = [k for k in need if k not in bundle.get("parts", {})]
  if lost:
    raise ValueError(f"error: {path}: no {', '.join(lost)} under 'parts'; re-run the default job")
  bundle["paths"] = {k: os.path.normpath(os.path.join(workdir, v)) for k, v in bundle["parts"].items()}
  return bundle


def check_bundle(bundle: dict) -> dict:
  """`check_compatible` over the bundle's parts (fingerprints computed now); returns them."""
  paths = bundle["paths"]
  parts = {name: fingerprint.model_part(paths[name]) for name in ("stage1", "s2a_1layer", "s2a_full")}
  for name in ("ssl_tokenizer", "acoustic_tokenizer"):
    parts[name] = fingerprint.data_part(paths[name])
  fingerprint.check_compatible(parts)
  return {name: parts[name]["fingerprint"] for name in ("ssl_tokenizer", "acoustic_tokenizer")}


def load_bundle(workdir: str, dtype: Optional[str] = None) -> DemoBundle:
  """Reads, checks and loads a default-job workdir (`dtype` overrides the models' compute dtype)."""
  bundle = read_bundle(workdir)
  fps = check_bundle(bundle)
  paths = bundle["paths"]
  options = {k: v for k, v in bundle.get("renderer", {}).items() if k != "type"}
  return DemoBundle(
      stage1=model_loading.load_stage1(paths["stage1"], dtype),
      s2a_full=model_loading.load_s2a(paths["s2a_full"], dtype),
      s2a_1layer=model_loading.load_s2a(paths["s2a_1layer"], dtype),
      tokenizer=model_loading.load_tokenizer(paths["ssl_tokenizer"]),
      renderer=mel_renderer.MelRenderer.load(paths["acoustic_tokenizer"], **options),
      paths=paths, fingerprints=fps)
