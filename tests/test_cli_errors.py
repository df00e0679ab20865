"""Every command turns user mistakes into one `error:` line and exit status 2; `--help` exits 0."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import train_testlib as lib
from tests.test_conversion import _malformed, _tiny_amphion

pytestmark = pytest.mark.slow  # each case starts a Python process that imports jax

COMMANDS = ("train", "train_compile", "train_eval", "codec_train", "convert", "decode", "codec_report",
            "data.tokenize", "data.fit_kmeans", "data.demo_corpus")
TINY = os.path.join(lib.REPO_ROOT, "configs", "tiny.py")


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
  env = lib.subprocess_env(devices=8)
  return subprocess.run([sys.executable, "-m", *args], cwd=lib.REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _assert_user_error(out: subprocess.CompletedProcess, *phrases: str) -> None:
  assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  for phrase in phrases:
    assert phrase in errors[0], (phrase, errors[0])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero(command):
  out = _run(f"metis_jax.{command}", "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() or out.stderr.strip()


@pytest.mark.parametrize("command", ("train", "train_compile", "train_eval"))
def test_config_typo_names_the_key_and_the_closest_one(command, tmp_path):
  out = _run(f"metis_jax.{command}", "--config", TINY, "--workdir", str(tmp_path), "--config.model.num_layer=4")
  _assert_user_error(out, "'model.num_layer'", "did you mean 'model.num_layers'")


@pytest.mark.parametrize("command", ("train", "train_compile", "data.fit_kmeans"))
def test_missing_config_file_says_so(command, tmp_path):
  out = _run(f"metis_jax.{command}", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path),
             "--input", "x", "--output", "y")
  _assert_user_error(out, "nope.py' does not exist")


def test_train_with_a_compilation_cache_folder_it_cannot_write(tmp_path):
  (tmp_path / "a_file").write_text("")
  out = _run("metis_jax.train", "--config", TINY, "--workdir", str(tmp_path / "run"),
             f"--compilation_cache_dir={tmp_path / 'a_file' / 'cache'}")
  _assert_user_error(out, "--compilation_cache_dir", "a_file/cache", "writable")


def test_train_compile_batch_that_does_not_divide_the_devices():
  out = _run("metis_jax.train_compile", "--config", TINY, "--topology", "cpu-8",
             "--config.train.global_batch_size=6")
  _assert_user_error(out, "train.global_batch_size=6", "multiple of 8")


def test_train_eval_on_a_stage1_workdir(tmp_path):
  os.makedirs(tmp_path / "run" / "checkpoints" / "3")
  out = _run("metis_jax.train_eval", "--config", TINY, "--workdir", str(tmp_path / "run"))
  _assert_user_error(out, "model.kind='metis'", "--heldout")


@pytest.mark.parametrize("case", ["rank1_cond_emb", "layer_key_x", "metadata_not_json", "metadata_json_list",
                                  "heads_do_not_divide", "nan_weights", "integer_weights"])
def test_convert_malformed_file(tmp_path, case):
  from metis_jax.conversion import common  # pylint: disable=import-outside-toplevel
  tensors, meta, heads = _malformed(case)
  path = str(tmp_path / "bad.safetensors")
  common.save_safetensors(path, tensors, meta)
  extra = ["--num_heads", str(heads)] if heads else []
  out = _run("metis_jax.convert", "--input", path, "--output", str(tmp_path / "out"), *extra)
  _assert_user_error(out)


def test_convert_reverse_on_an_edited_config_and_on_a_training_workdir(tmp_path):
  from metis_jax.conversion import common  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "good.safetensors")
  common.save_safetensors(path, _tiny_amphion(), {"config": json.dumps({"num_heads": 2})})
  converted = str(tmp_path / "converted")
  out = _run("metis_jax.convert", "--input", path, "--output", converted)
  assert out.returncode == 0, out.stderr[-3000:]
  config_file = os.path.join(converted, "model_config.json")
  with open(config_file) as f:
    config = json.load(f)
  config["num_layers"] += 1
  with open(config_file, "w") as f:
    json.dump(config, f)
  out = _run("metis_jax.convert", "--reverse", "--input", converted, "--output", str(tmp_path / "back.safetensors"))
  _assert_user_error(out, "model_config.json")

  workdir = tmp_path / "workdir"
  os.makedirs(workdir / "checkpoints" / "4")
  shutil.copy(config_file, workdir / "config.json")
  out = _run("metis_jax.convert", "--reverse", "--input", str(workdir), "--output", str(tmp_path / "w.safetensors"))
  _assert_user_error(out, "model_config.json")
