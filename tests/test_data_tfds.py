"""The TFDS builder (ArrayRecord) and reading it through the training pipeline."""

import importlib.util
import math
import os
import subprocess

import numpy as np
import pytest
import soundfile

tfds = pytest.importorskip("tensorflow_datasets",
                           reason="tensorflow_datasets is not installed (pip install 'metis_jax[tfds]')")

from metis_jax import config_base  # noqa: E402
from metis_jax.data import demo_corpus  # noqa: E402
from metis_jax.data import pipeline  # noqa: E402
from metis_jax.data import synthetic  # noqa: E402
from metis_jax.data import tfds_builder  # noqa: E402
from metis_jax.data import tokenizer as tk  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_from_shards_and_read_with_pipeline(tmp_path):
  manual = str(tmp_path / "manual")
  data = synthetic.write_token_shards(manual, 57, 2, min_tokens=30, max_tokens=120, seed=3)
  folder = tfds_builder.build(manual, str(tmp_path / "tfds"))
  assert any(f.startswith("metis_tokens-train.array_record") for f in os.listdir(folder))
  source = tfds.data_source("metis_tokens", split="train", data_dir=str(tmp_path / "tfds"))
  assert len(source) == 57
  ex = source[0]
  rid = ex["id"].decode()
  np.testing.assert_array_equal(ex["ssl_tokens"], data[rid])
  ids = []
  for p in range(2):
    ds = pipeline.element_dataset(["tfds:metis_tokens"], max_length=512, num_epochs=1, process_index=p,
                                  process_count=2, tfds_data_dir=str(tmp_path / "tfds"), keep_ids=True)
    for e in ds.to_iter_dataset():
      np.testing.assert_array_equal(e["tokens"], data[e["id"]])
      ids.append(e["id"])
  assert sorted(ids) == sorted(data)
  config = config_base.get_config()
  config.train.global_batch_size, config.train.seq_length = 4, 128
  config.data.train_sources = ("tfds:metis_tokens",)
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  config.data.num_workers = 0
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  batch = next(it)
  it.close()
  assert batch["tokens"].shape[0] == 4 and batch["valid"].any(axis=1).all()


def test_build_from_audio_with_tokenizer(tmp_path):
  manual = tmp_path / "manual"
  demo_corpus.generate(str(manual), languages=("de",), speakers_per_language=1, sentences_per_speaker=3)
  tok = tk.KMeansTokenizer(np.random.default_rng(0).standard_normal((12, tk.FEATURE_DIM)))
  tok.save(str(manual / "tokenizer"))
  tfds_builder.build(str(manual), str(tmp_path / "tfds"))
  source = tfds.data_source("metis_tokens", split="train", data_dir=str(tmp_path / "tfds"))
  assert len(source) == 3
  for i in range(3):
    ex = source[i]
    wav = os.path.join(manual, ex["id"].decode() + ".wav")
    frames = soundfile.info(wav).frames
    assert len(ex["ssl_tokens"]) == tk.num_ssl_frames(math.ceil(frames * 16000 / 22050))
    assert ex["language"] == b"de" and ex["text"] and ex["ssl_tokens"].max() < 12


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="the `tfds build` command line needs TensorFlow (pip install 'metis_jax[tfds]')")
def test_tfds_build_command_line(tmp_path):
  manual = str(tmp_path / "manual")
  synthetic.write_token_shards(manual, 10, 1, seed=4)
  subprocess.run(["tfds", "build", os.path.join(REPO, "metis_jax", "data", "tfds_builder.py"),
                  "--manual_dir", manual, "--data_dir", str(tmp_path / "tfds"), "--file_format", "array_record"],
                 check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert len(tfds.data_source("metis_tokens", split="train", data_dir=str(tmp_path / "tfds"))) == 10
