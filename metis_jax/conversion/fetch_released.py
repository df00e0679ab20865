"""Downloads the released weights into one folder, laid out as `conversion.released` reads it.

  python -m metis_jax.fetch --released_dir /ckpt/released              # TTS: MaskGCT + w2v-BERT + stats + vocab
  python -m metis_jax.fetch --released_dir /ckpt/released --groups tts,metis   # plus Metis base and fine-tunes
  python -m metis_jax.fetch --released_dir /ckpt/released --names metis_base,metis_se_lora --dry_run

Hugging Face files come through `huggingface_hub` (the optional `fetch`
extra: `pip install huggingface_hub`); the two files that live in Amphion's
GitHub repository (the w2v-BERT statistics and the G2P vocabulary) through
urllib. Files already present are skipped. Needs internet; nothing in the
package calls it on its own.
"""

import argparse
import os
import shutil
import sys
import urllib.request
from typing import Optional, Sequence

from metis_jax.conversion import released

INSTALL_HINT = "pip install huggingface_hub  (or pip install -e '.[fetch]')"


def plan(released_dir: str, groups: Sequence[str] = ("tts",), names: Optional[Sequence[str]] = None) -> list:
  """The `ReleasedFile`s to download (those not already present), in `released.RELEASED` order."""
  if names:
    unknown = [n for n in names if n not in released.BY_NAME]
    if unknown:
      raise ValueError(f"error: unknown --names {', '.join(unknown)}; known: {', '.join(released.BY_NAME)}")
    chosen = [released.BY_NAME[n] for n in names]
  else:
    bad = [g for g in groups if g not in released.GROUPS]
    if bad:
      raise ValueError(f"error: unknown --groups {', '.join(bad)}; known: {', '.join(released.GROUPS)}")
    chosen = [f for f in released.RELEASED if f.group in groups]
  present = released.resolve(released_dir) if os.path.isdir(released_dir) else {}
  return [f for f in chosen if f.name not in present]


def _download_hf(f: released.ReleasedFile, released_dir: str) -> str:
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"error: fetching {f.repo} needs huggingface_hub: {INSTALL_HINT}") from e
  # local_dir puts the file at <local_dir>/<repo_path>; w2v-BERT's lone model.safetensors gets its own folder.
  prefix = f.local[:-len(f.repo_path)] if f.local.endswith(f.repo_path) else ""
  return huggingface_hub.hf_hub_download(f.repo, f.repo_path, local_dir=os.path.join(released_dir, prefix))


def _download_url(f: released.ReleasedFile, released_dir: str) -> str:
  dest = os.path.join(released_dir, f.local)
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  with urllib.request.urlopen(f.url, timeout=60) as r, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(r, out)
  os.replace(dest + ".part", dest)
  return dest


def fetch(released_dir: str, groups: Sequence[str] = ("tts",), names: Optional[Sequence[str]] = None,
          dry_run: bool = False, log=print) -> list:
  """Downloads what `plan` lists; returns the local paths (would-be paths with `dry_run`)."""
  todo = plan(released_dir, groups, names)
  out = []
  for i, f in enumerate(todo):
    dest = os.path.join(released_dir, f.local)
    log(f"[{i + 1}/{len(todo)}] {f.url} -> {dest}")
    if not dry_run:
      dest = _download_url(f, released_dir) if f.repo.startswith("github:") else _download_hf(f, released_dir)
    out.append(dest)
  if not todo:
    log(f"everything asked for is already in {released_dir}")
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--released_dir", required=True, help="folder to download into")
  parser.add_argument("--groups", default="tts", help="comma-separated: tts (MaskGCT TTS pipeline), metis")
  parser.add_argument("--names", default="", help="comma-separated file names instead of groups: "
                      + ",".join(released.BY_NAME))
  parser.add_argument("--dry_run", action="store_true", help="print what would be downloaded")
  parser.add_argument("--list", action="store_true", help="print which files the folder has and lacks")
  args = parser.parse_args(argv)
  try:
    if args.list:
      print(released.report(args.released_dir))
      return 0
    fetch(args.released_dir, [g for g in args.groups.split(",") if g],
          [n for n in args.names.split(",") if n] or None, args.dry_run)
  except (ValueError, FileNotFoundError) as e:
    print(str(e) if str(e).startswith("error:") else f"error: {e}", file=sys.stderr)
    return 2
  if not args.dry_run:
    print(f"done; see what is there with: python -m metis_jax.fetch --released_dir {args.released_dir} --list")
  return 0


def run_main() -> None:
  """`python -m metis_jax.fetch`."""
  sys.exit(main())


if __name__ == "__main__":
  run_main()
