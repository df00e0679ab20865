"""The released weights as downloaded: which file is which, where it comes from, what is missing.

One folder (`--released_dir`) holds the files at the paths they have in their
repositories (what `huggingface_hub` writes with `local_dir=`):

  <released_dir>/t2s_model/model.safetensors                       amphion/MaskGCT
  <released_dir>/s2a_model/s2a_model_1layer/model.safetensors      amphion/MaskGCT
  <released_dir>/s2a_model/s2a_model_full/model.safetensors        amphion/MaskGCT
  <released_dir>/acoustic_codec/model.safetensors      (encoder)   amphion/MaskGCT
  <released_dir>/acoustic_codec/model_1.safetensors    (decoder)   amphion/MaskGCT
  <released_dir>/semantic_codec/model.safetensors                  amphion/MaskGCT
  <released_dir>/metis_base/model.safetensors                      amphion/metis
  <released_dir>/metis_{se,tse}/metis_{se,tse}_lora_32[_adapter].safetensors   amphion/metis
  <released_dir>/metis_vc/metis_vc_lora_16[_adapter].safetensors   amphion/metis
  <released_dir>/metis_l2s/*.safetensors, metis_omni/metis_omni.safetensors   amphion/metis
  <released_dir>/w2v-bert-2.0/model.safetensors                    facebook/w2v-bert-2.0
  <released_dir>/wav2vec2bert_stats.pt  (or its converted w2v_stats.npz)   github open-mmlab/Amphion
  <released_dir>/vocab.json             (the G2P phone vocabulary)  github open-mmlab/Amphion

A file is also found one level down, under its repository's name
(`<released_dir>/MaskGCT/t2s_model/model.safetensors`, `.../metis/...`), as
when each repository was downloaded into its own folder.
`python -m metis_jax.fetch --released_dir DIR` downloads them
(`metis_jax.conversion.fetch_released`).
"""

import dataclasses
import glob
import os
from typing import Optional, Sequence

AMPHION_GITHUB = "open-mmlab/Amphion"


@dataclasses.dataclass(frozen=True)
class ReleasedFile:
  """One released file.

  Attributes:
    name: its key in `resolve`'s result.
    repo: Hugging Face repository id, or `github:<owner>/<repo>`.
    repo_path: the file's path in that repository.
    local: where it lies under the released folder.
    what: what it is.
    group: 'tts' (MaskGCT TTS and the SSL tokenizer) or 'metis' (the Metis base and fine-tunes).
    alternatives: other accepted paths under the folder (globs allowed), first match wins.
  """
  name: str
  repo: str
  repo_path: str
  local: str
  what: str
  group: str
  alternatives: tuple = ()

  @property
  def url(self) -> str:
    if self.repo.startswith("github:"):
      return f"https://raw.githubusercontent.com/{self.repo[len('github:'):]}/main/{self.repo_path}"
    return f"https://huggingface.co/{self.repo}/resolve/main/{self.repo_path}"


def _hf(name, repo, path, what, group, local=None, alternatives=()):
  return ReleasedFile(name, repo, path, local or path, what, group, tuple(alternatives))


RELEASED: tuple = (
    _hf("t2s", "amphion/MaskGCT", "t2s_model/model.safetensors",
        "MaskGCT T2S = Metis TTS stage 1 (phone prefix)", "tts"),
    _hf("s2a_1layer", "amphion/MaskGCT", "s2a_model/s2a_model_1layer/model.safetensors",
        "S2A 1-layer (acoustic codec layer 0 from SSL tokens)", "tts"),
    _hf("s2a_full", "amphion/MaskGCT", "s2a_model/s2a_model_full/model.safetensors",
        "S2A full (codec layers 1-11 given layer 0)", "tts"),
    _hf("codec_encoder", "amphion/MaskGCT", "acoustic_codec/model.safetensors",
        "acoustic codec encoder (+ residual VQ)", "tts"),
    _hf("codec_decoder", "amphion/MaskGCT", "acoustic_codec/model_1.safetensors",
        "acoustic codec decoder (Vocos)", "tts"),
    _hf("semantic_codec", "amphion/MaskGCT", "semantic_codec/model.safetensors",
        "semantic codec (w2v-BERT layer 17 -> 8192 SSL tokens)", "tts"),
    _hf("w2v_bert", "facebook/w2v-bert-2.0", "model.safetensors", "w2v-BERT 2.0 encoder", "tts",
        local="w2v-bert-2.0/model.safetensors", alternatives=("facebook/w2v-bert-2.0/model.safetensors",)),
    _hf("w2v_bert_stats", "github:" + AMPHION_GITHUB, "models/tts/maskgct/ckpt/wav2vec2bert_stats.pt",
        "w2v-BERT layer-17 mean/var (torch .pt; or converted .npz)", "tts", local="wav2vec2bert_stats.pt",
        alternatives=("w2v_stats.npz", "wav2vec2bert_stats.npz")),
    _hf("g2p_vocab", "github:" + AMPHION_GITHUB, "models/tts/maskgct/g2p/g2p/vocab.json",
        "G2P phone vocabulary of the T2S model", "tts", local="vocab.json", alternatives=("g2p/vocab.json",)),
    _hf("metis_base", "amphion/metis", "metis_base/model.safetensors", "Metis base (pre-trained stage 1)", "metis"),
    _hf("metis_se_lora", "amphion/metis", "metis_se/metis_se_lora_32.safetensors", "Metis SE LoRA (r=32)", "metis"),
    _hf("metis_se_adapter", "amphion/metis", "metis_se/metis_se_lora_32_adapter.safetensors",
        "Metis SE adapter", "metis"),
    _hf("metis_tse_lora", "amphion/metis", "metis_tse/metis_tse_lora_32.safetensors", "Metis TSE LoRA (r=32)",
        "metis"),
    _hf("metis_tse_adapter", "amphion/metis", "metis_tse/metis_tse_lora_32_adapter.safetensors",
        "Metis TSE adapter", "metis"),
    _hf("metis_vc_lora", "amphion/metis", "metis_vc/metis_vc_lora_16.safetensors", "Metis VC LoRA (r=16)", "metis"),
    _hf("metis_vc_adapter", "amphion/metis", "metis_vc/metis_vc_lora_16_adapter.safetensors",
        "Metis VC adapter", "metis"),
    # The L2S file name is not given in the model card: any .safetensors in metis_l2s/ is accepted.
    _hf("metis_l2s", "amphion/metis", "metis_l2s/metis_l2s.safetensors", "Metis L2S (full fine-tune)", "metis",
        alternatives=("metis_l2s/*.safetensors",)),
    _hf("metis_omni", "amphion/metis", "metis_omni/metis_omni.safetensors", "Metis Omni (TTS, VC, TSE, SE)",
        "metis"),
)
BY_NAME = {f.name: f for f in RELEASED}
GROUPS = ("tts", "metis")


def _repo_folder(f: ReleasedFile) -> str:
  return f.repo.split("/")[-1]


def find(released_dir: str, f: ReleasedFile) -> Optional[str]:
  """The path of one released file under the folder, or None."""
  for base in (released_dir, os.path.join(released_dir, _repo_folder(f))):
    for rel in (f.local,) + f.alternatives:
      hits = sorted(glob.glob(os.path.join(base, rel))) if any(c in rel for c in "*?[") else [os.path.join(base, rel)]
      for hit in hits:
        if os.path.isfile(hit):
          return hit
  return None


def resolve(released_dir: str, names: Optional[Sequence[str]] = None) -> dict:
  """{name: path} of the released files present under `released_dir` (of `names`, default all).

  Raises:
    FileNotFoundError: the folder does not exist.
    KeyError: an unknown name.
  """
  if not os.path.isdir(released_dir):
    raise FileNotFoundError(f"error: --released_dir {released_dir}: no such folder")
  out = {}
  for name in names or BY_NAME:
    if name not in BY_NAME:
      raise KeyError(f"unknown released file {name!r}; known: {', '.join(BY_NAME)}")
    path = find(released_dir, BY_NAME[name])
    if path is not None:
      out[name] = path
  return out


def missing(released_dir: str, names: Optional[Sequence[str]] = None) -> list:
  """The names (of `names`, default all) not found under `released_dir`."""
  found = resolve(released_dir, names)
  return [n for n in (names or BY_NAME) if n not in found]


def require(released_dir: str, names: Sequence[str]) -> dict:
  """`resolve` for parts that must all be there; else one `error:` line naming the missing files."""
  found = resolve(released_dir, names)
  lost = [n for n in names if n not in found]
  if lost:
    files = ", ".join(f"{BY_NAME[n].local} ({BY_NAME[n].repo})" for n in lost)
    raise FileNotFoundError(f"error: --released_dir {released_dir} lacks {files}; fetch them with "
                            f"`python -m metis_jax.fetch --released_dir {released_dir}`")
  return found


def report(released_dir: str) -> str:
  """A table: each released file, present (its path) or missing (where it comes from)."""
  found = resolve(released_dir)
  lines = []
  for f in RELEASED:
    state = found.get(f.name)
    lines.append(f"{'ok     ' if state else 'missing'} {f.name:18s} {state or f.local:60s} {f.repo}")
  return "\n".join(lines)


# Decode's flags for the TTS pipeline, from the released folder.
DECODE_FLAGS = (("model", "t2s"), ("s2a_1layer", "s2a_1layer"), ("s2a_full", "s2a_full"),
                ("codec_encoder", "codec_encoder"), ("codec_decoder", "codec_decoder"), ("vocab", "g2p_vocab"))


def decode_flags(released_dir: str, stage1: str = "t2s") -> dict:
  """{decode flag: path} for the files present (`--model` from `stage1`: 't2s' or 'metis_base')."""
  found = resolve(released_dir)
  out = {flag: found[name] for flag, name in DECODE_FLAGS if name in found}
  out.pop("model", None)
  if stage1 in found:
    out["model"] = found[stage1]
  return out


# The released stage-1 models: part -> (model, LoRA, adapter) file names above. What `convert
# --released_dir DIR --part P` converts and what `decode --released_dir` runs per task.
STAGE1_PARTS = {
    "t2s": ("t2s", None, None),
    "metis_base": ("metis_base", None, None),
    "metis_se": ("metis_base", "metis_se_lora", "metis_se_adapter"),
    "metis_tse": ("metis_base", "metis_tse_lora", "metis_tse_adapter"),
    "metis_vc": ("metis_base", "metis_vc_lora", "metis_vc_adapter"),
    "metis_l2s": ("metis_l2s", None, None),
    "metis_omni": ("metis_omni", None, None),
}


def stage1_files(released_dir: str, part: str) -> dict:
  """{"input", "lora", "adapter"} paths (None where the part has none) of a released stage-1 model.

  Raises:
    ValueError: an unknown part (one line listing the known ones).
    FileNotFoundError: a file of the part is not in the folder (one line naming it).
  """
  if part not in STAGE1_PARTS:
    raise ValueError(f"error: --part {part!r}: expected one of {', '.join(STAGE1_PARTS)}")
  names = STAGE1_PARTS[part]
  found = require(released_dir, [n for n in names if n])
  return dict(zip(("input", "lora", "adapter"), (found[n] if n else None for n in names)))


def tokenizer_files(released_dir: str) -> tuple:
  """(w2v-BERT encoder, statistics, semantic codec) paths for `ssl_tokenizer.W2VBertCodecTokenizer.from_files`.

  The statistics must be the converted `.npz` (converting the `.pt` needs torch: the `stats`
  extra, `metis_jax.conversion.w2v_bert.convert_stats`).
  """
  found = require(released_dir, ("w2v_bert", "w2v_bert_stats", "semantic_codec"))
  stats = found["w2v_bert_stats"]
  if stats.endswith(".pt"):
    npz = os.path.join(os.path.dirname(stats), "w2v_stats.npz")
    raise FileNotFoundError(
        f"error: {stats} is a torch file: convert it once with `pip install torch` (CPU build) and "
        f"`python -c \"from metis_jax.conversion import w2v_bert; w2v_bert.convert_stats('{stats}', '{npz}')\"`")
  return found["w2v_bert"], stats, found["semantic_codec"]
