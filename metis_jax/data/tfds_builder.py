"""TFDS builder of tokenized speech (`metis_tokens`), stored as ArrayRecord.

Needs the `tfds` extra (`pip install 'metis_jax[tfds]'`); TensorFlow itself
is not needed to build or to read ArrayRecord datasets.

Build (either command; the first needs no TensorFlow, the `tfds` CLI does):
  python -m metis_jax.data.tfds_builder --manual_dir DIR --data_dir ~/tensorflow_datasets
  tfds build metis_jax/data/tfds_builder.py --manual_dir DIR \
      --data_dir ~/tensorflow_datasets --file_format array_record

DIR holds either
  * tokenized shards written by `python -m metis_jax.data.tokenize`
    (`*.array_record`), which are converted record by record; or
  * an audio corpus in any layout `readers` ingests, with the saved SSL
    tokenizer in `DIR/tokenizer/` (e.g. from `fit_kmeans`); it is decoded
    and tokenized during the build with the default `config.data` settings.

Read it in the training pipeline with
`config.data.train_sources = ('tfds:metis_tokens',)` (and
`config.data.tfds_data_dir`), which opens `tfds.data_source(...)`.
"""

import concurrent.futures
import glob
import importlib.resources
import os
import sys
from typing import Any, Iterator

import numpy as np
try:
  import tensorflow_datasets as tfds
except ImportError:
  if __name__ != "__main__":
    raise
  # The command without the extra: --help still answers, anything else is one error line.
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in sys.argv[1:]):
    print(__doc__)
    sys.exit(0)
  print("error: the TFDS builder needs tensorflow-datasets: pip install -e \".[tfds]\"", file=sys.stderr)
  sys.exit(2)

try:
  import importlib_resources  # noqa: F401  pylint: disable=unused-import
except ImportError:
  # TFDS 4.9.x resolves the code path of builders that live in a package with
  # the `importlib_resources` backport, which it does not install on Python
  # >= 3.9; the standard library module has the same API for that use.
  import importlib.resources.abc  # pylint: disable=g-import-not-at-top,unused-import
  sys.modules.setdefault("importlib_resources", importlib.resources)

from metis_jax.data import records
from metis_jax.data import shards


def _example(rec: dict[str, Any]) -> dict[str, Any]:
  return {"id": rec["id"], "ssl_tokens": np.asarray(rec["ssl_tokens"], np.int16), "text": rec["text"],
          "speaker": rec["speaker"], "language": rec["language"], "duration": np.float32(rec["duration"])}


def examples_from_shards(paths) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, example) for every record of tokenized shards."""
  for path in paths:
    for raw in shards.read_all([path]):
      rec = records.decode(raw)
      yield rec["id"], _example(rec)


def examples_from_audio(corpus: str, tokenizer_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, example) for an audio corpus, tokenized with the saved tokenizer."""
  from metis_jax import config_base  # pylint: disable=g-import-not-at-top
  from metis_jax.data import readers  # pylint: disable=g-import-not-at-top
  from metis_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  from metis_jax.frontend import tokenizers  # pylint: disable=g-import-not-at-top
  cfg = config_base.data_config()
  tok = tokenizers.load_tokenizer(tokenizer_dir)
  runner = tokenize.DeviceRunner(tok, cfg)
  units = readers.plan_units(corpus, cfg.layout, cfg.files_per_shard)
  with concurrent.futures.ThreadPoolExecutor(max(1, cfg.decode_threads)) as pool:
    for unit in units:
      decoded, _ = tokenize.decode_unit(unit, cfg, (runner.rate,), pool)
      tokens = runner([d.waves[runner.rate] for d in decoded])
      for d, t in zip(decoded, tokens):
        yield d.utt.id, _example({"id": d.utt.id, "ssl_tokens": t, "text": d.utt.text, "speaker": d.utt.speaker,
                                  "language": d.utt.language, "duration": d.duration})


class MetisTokens(tfds.core.GeneratorBasedBuilder):
  """SSL tokens (50 Hz, int16) of a speech corpus, with transcript and speaker."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="SSL tokens of speech for Metis pre-training (metis_jax).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "ssl_tokens": tfds.features.Tensor(shape=(None,), dtype=np.int16),
            "text": tfds.features.Text(),
            "speaker": tfds.features.Text(),
            "language": tfds.features.Text(),
            "duration": tfds.features.Scalar(dtype=np.float32),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = os.fspath(dl_manager.manual_dir)
    return {"train": self._generate_examples(manual)}

  def _generate_examples(self, manual_dir: str):
    found = sorted(glob.glob(os.path.join(manual_dir, "*" + shards.SHARD_SUFFIX)))
    if found:
      yield from examples_from_shards(found)
      return
    tokenizer_dir = os.path.join(manual_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
      raise FileNotFoundError(f"{manual_dir}: neither *.array_record shards nor a tokenizer/ folder "
                              "(see the builder's docstring)")
    yield from examples_from_audio(manual_dir, tokenizer_dir)


def build(manual_dir: str, data_dir: str) -> str:
  """Builds `metis_tokens` in ArrayRecord format; returns the dataset folder."""
  builder = MetisTokens(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_dir)


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual_dir", required=True, help="tokenized shards, or audio + tokenizer/")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to build into")
  args = parser.parse_args(argv)
  print(f"built metis_tokens in {build(args.manual_dir, args.data_dir)}")


if __name__ == "__main__":
  from metis_jax import cli_support  # pylint: disable=g-import-not-at-top
  cli_support.run(main)
