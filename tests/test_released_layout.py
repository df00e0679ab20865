"""The released folder layout (`conversion.released`) on a folder arranged like the release from the
parity fixtures' files, and the fetch command's plan (no network)."""

import os

import pytest

from metis_jax.conversion import fetch_released, released
from tests import conftest

PARITY = conftest.PARITY
# Release path -> the parity fixture standing in for it (same key names and layout, small sizes).
LAYOUT = {
    "t2s_model/model.safetensors": "t2s_phones/weights.safetensors",
    "s2a_model/s2a_model_1layer/model.safetensors": "s2a_1layer/weights.safetensors",
    "s2a_model/s2a_model_full/model.safetensors": "s2a_full/weights.safetensors",
    "acoustic_codec/model.safetensors": "acoustic_codec/encoder.safetensors",
    "acoustic_codec/model_1.safetensors": "acoustic_codec/decoder.safetensors",
    "semantic_codec/model.safetensors": "semantic_codec/weights.safetensors",
    "metis_base/model.safetensors": "metis_ft_adapter_lora/base.safetensors",
    "metis_se/metis_se_lora_32.safetensors": "metis_ft_adapter_lora/lora.safetensors",
    "metis_se/metis_se_lora_32_adapter.safetensors": "metis_ft_adapter_lora/adapter.safetensors",
    "metis_l2s/some_l2s_name.safetensors": "metis_ft_l2s/weights.safetensors",
    "w2v-bert-2.0/model.safetensors": "hf_w2v_bert/weights.safetensors",
}


def _arrange(root, layout):
  for rel, src in layout.items():
    dest = os.path.join(root, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.symlink(os.path.abspath(os.path.join(PARITY, src)), dest)


@pytest.fixture()
def release(tmp_path):
  conftest.require_dir(PARITY)
  root = str(tmp_path / "released")
  _arrange(root, LAYOUT)
  return root


def test_resolve_finds_each_part_at_its_release_path_and_reports_the_rest_missing(release):
  found = released.resolve(release)
  assert found["t2s"] == os.path.join(release, "t2s_model/model.safetensors")
  assert found["codec_decoder"] == os.path.join(release, "acoustic_codec/model_1.safetensors")
  assert found["metis_l2s"].endswith("metis_l2s/some_l2s_name.safetensors")  # any file name in metis_l2s/
  assert set(released.missing(release)) == {"w2v_bert_stats", "g2p_vocab", "metis_tse_lora", "metis_tse_adapter",
                                            "metis_vc_lora", "metis_vc_adapter", "metis_omni"}
  table = released.report(release)
  assert "missing metis_omni" in table and "ok      t2s" in table


def test_resolved_files_load_through_the_converters(release):
  from metis_jax.conversion import acoustic_codec, s2a, t2s
  found = released.resolve(release)
  cfg, _ = t2s.load_amphion(found["t2s"])
  assert cfg.use_phone_cond
  cfg, _ = s2a.load_amphion(found["s2a_full"])
  assert cfg.num_quantizers == 12
  cfg, _ = acoustic_codec.load_amphion(found["codec_encoder"], found["codec_decoder"])
  assert cfg.num_quantizers == 12


def test_decode_flags_and_a_missing_part_is_one_line_naming_the_file(release):
  flags = released.decode_flags(release)
  assert flags["model"].endswith("t2s_model/model.safetensors")
  assert flags["s2a_1layer"].endswith("s2a_model_1layer/model.safetensors")
  assert "vocab" not in flags  # not in this folder
  assert released.decode_flags(release, stage1="metis_base")["model"].endswith("metis_base/model.safetensors")
  with pytest.raises(FileNotFoundError) as e:
    released.require(release, ("t2s", "g2p_vocab"))
  msg = str(e.value)
  assert msg.startswith("error:") and "vocab.json" in msg and "metis_jax.fetch" in msg and "\n" not in msg


def test_files_under_a_repository_named_folder_are_found(tmp_path):
  root = str(tmp_path / "r")
  _arrange(root, {"MaskGCT/t2s_model/model.safetensors": "t2s_phones/weights.safetensors"})
  assert released.resolve(root, ["t2s"])["t2s"].endswith("MaskGCT/t2s_model/model.safetensors")


def test_fetch_plans_only_what_is_missing_and_never_downloads_in_a_dry_run(release, capsys):
  todo = [f.name for f in fetch_released.plan(release, ("tts",))]
  assert todo == ["w2v_bert_stats", "g2p_vocab"]
  assert fetch_released.main(["--released_dir", release, "--groups", "tts,metis", "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "https://huggingface.co/amphion/metis/resolve/main/metis_omni/metis_omni.safetensors" in out
  assert "raw.githubusercontent.com/open-mmlab/Amphion/main/models/tts/maskgct/g2p/g2p/vocab.json" in out
  assert not os.path.exists(os.path.join(release, "vocab.json"))
  assert fetch_released.main(["--released_dir", release, "--groups", "nope", "--dry_run"]) == 2
  assert capsys.readouterr().err.startswith("error: unknown --groups nope")
