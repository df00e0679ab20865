"""Codec training in the one training loop: sharded state on a 2-device mesh, exact resume,
non-finite updates skipped and never saved, the export, on-the-fly semantic features, and the
raw-audio Grain pipeline."""

import os
import shutil

import jax
import numpy as np
import pytest
import soundfile
from jax.sharding import PartitionSpec as P

from metis_jax.training import checkpointing
from metis_jax.training import codec_data
from metis_jax.training import codec_objective
from metis_jax.training import codec_step as codec_train_step
from metis_jax.training import codec_state as cts
from metis_jax.training import loop as train_loop
from metis_jax.training import masked_objective
from metis_jax import config_base
from metis_jax import config_lib
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.conversion import acoustic_codec as ac_convert
from metis_jax.data import waveform_pipeline as wp

# A micro acoustic codec (hop 6, 2 x 16-code RVQ, one Vocos layer of width 32) with one period
# and one spectrogram discriminator: compiles in seconds.
MICRO_ACOUSTIC = [
    "model.encoder_dim=8", "model.up_ratios=(6,)", "model.latent_dim=16", "model.num_quantizers=2",
    "model.codebook_size=16", "model.codebook_dim=4", "model.vocos_dim=32", "model.vocos_intermediate_dim=32",
    "model.vocos_num_layers=1", "model.n_fft=24", "model.hop_size=6",
    "train.mpd_periods=(2,)", "train.mrd_ffts=(64,)", "train.disc_channels=4", "train.disc_max_channels=16",
    "train.mel_windows=(32, 128)", "train.mel_bins=(5, 20)", "train.crop_seconds=0.05",
    "train.global_batch_size=4", "train.learning_rate=3e-3", "train.warmup_steps=0",
    "mesh.fsdp=2", "checkpoint.every_steps=1", "checkpoint.keep=10", "logging.log_every_steps=1", "logging.tensorboard=False",
    "data.num_workers=0",
]


def _flat(tree):
  return jax.tree_util.tree_leaves_with_path(jax.device_get(tree))


def _assert_same(a, b):
  la, lb = _flat(a), _flat(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _restore(workdir, step, config, devices):
  setup = cts.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  data = codec_data.make_data_iterator(config, setup, mesh, 0, 1)
  try:
    return ckpt.restore(step, cts.abstract_state(setup, mesh), data), data
  finally:
    ckpt.close()


@pytest.mark.slow
def test_acoustic_codec_trains_sharded_resumes_exactly_and_skips_nonfinite(tmp_path, speech_dir):
  devices = jax.devices()[:2]
  # Step 3's generator update gets NaN gradients; dead codes are restarted every 2 steps.
  config = config_lib.load_config("acoustic_codec_tiny", MICRO_ACOUSTIC + [
      "train.steps=4", "train.inject_nan_at_step=3", "train.restart_every=2",
      f"data.train_sources=('{speech_dir}',)"])
  whole = str(tmp_path / "whole")
  result = train_loop.train(config, whole, devices=devices, return_state=True)
  assert result.final_step == 4 and result.skipped_files == 0
  assert [h["skipped"] for h in result.history] == [0, 0, 1, 0]
  assert [h["disc_skipped"] for h in result.history] == [0, 0, 0, 0]
  assert all(np.isfinite(h["mel"]) for h in result.history if not h["skipped"])
  state = result.state
  assert int(state.step) == 4 and int(state.skipped_steps["generator"]) == 1

  # Parameters and Adam moments are laid out by the logical rules: Vocos matmuls ('embed',
  # 'mlp') over fsdp x tensor, convolutions (conv_in/conv_out) replicated.
  kernel = state.params["generator"]["decoder"]["backbone"]["layers"]["pwconv1"]["kernel"]
  assert kernel.shape == (1, 32, 32) and kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(1, 16, 32)}
  mu = state.opt_state["generator"][1][0].mu["decoder"]["backbone"]["layers"]["pwconv1"]["kernel"]
  assert mu.sharding.spec == P(None, "fsdp", "tensor")
  disc_kernel = state.params["discriminator"]["mpd_2"]["conv_1"]["kernel"]
  assert disc_kernel.sharding.is_fully_replicated and len(disc_kernel.sharding.device_set) == 2

  # The skipped update left generator and its optimizer state exactly as they were, and was
  # still checkpointed (finite); the next step trained again.
  assert _checkpoint_steps(whole) == [1, 2, 3, 4]
  two, _ = _restore(whole, 2, config, devices)
  three, _ = _restore(whole, 3, config, devices)
  _assert_same(three.params["generator"], two.params["generator"])
  _assert_same(three.opt_state["generator"], two.opt_state["generator"])
  assert not np.array_equal(three.params["discriminator"]["mpd_2"]["conv_0"]["kernel"],
                            two.params["discriminator"]["mpd_2"]["conv_0"]["kernel"])

  # A state with a non-finite parameter is never written.
  poisoned = state.replace(params=jax.tree.map(lambda x: x.at[0].set(np.nan) if x.ndim else x, state.params))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "poisoned"), config.checkpoint)
  assert not ckpt.save(5, poisoned, None, force=True)
  ckpt.close()

  # Killed after step 2 (its checkpoint saved), then resumed: the same results, bit for bit.
  resumed_dir = str(tmp_path / "resumed")
  killed = train_loop.train(config, resumed_dir, devices=devices, stop_after=2)
  assert killed.final_step == 2 and killed.exported == []
  resumed = train_loop.train(config, resumed_dir, devices=devices, return_state=True)
  assert resumed.start_step == 2 and resumed.final_step == 4
  np.testing.assert_equal(_untimed(resumed.history), _untimed(result.history[2:]))  # NaN == NaN here
  _assert_same(resumed.state.params, state.params)
  _assert_same(resumed.state.opt_state, state.opt_state)
  np.testing.assert_array_equal(jax.device_get(resumed.state.usage), jax.device_get(state.usage))

  # The export is the released two-file layout of the final generator.
  assert [os.path.basename(p) for p in result.exported] == ["encoder.safetensors", "decoder.safetensors"]
  cfg, params = ac_convert.load_amphion(*result.exported)
  assert cfg.hop_size == 6 and cfg.num_quantizers == 2
  np.testing.assert_allclose(params["decoder"]["quantizer"]["layers_1"]["codebook"],
                             jax.device_get(state.params["generator"]["decoder"]["quantizer"]["layers_1"]["codebook"]))


@pytest.mark.slow
def test_first_batch_draws_the_codebooks(speech_dir):
  """codebook_init='data': before the first step, every RVQ layer's rows become projected latents
  of the first batch (the codes then sit at the latents' scale), and nothing else changes."""
  config = config_lib.load_config("acoustic_codec_tiny", MICRO_ACOUSTIC + [
      "mesh.fsdp=1", f"data.train_sources=('{speech_dir}',)"])
  assert config.train.codebook_init == "data"
  setup = cts.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:1])
  state = cts.create_sharded_state(setup, mesh, config.seed)
  before = jax.device_get(state.params["generator"])
  data = codec_data.make_data_iterator(config, setup, mesh, 0, 1)
  batch = next(data)
  steps = codec_train_step.jit_steps(setup, config, mesh, cts.state_shardings(setup, mesh))
  after = jax.device_get(steps.init_codebooks(state, batch).params["generator"])

  quantizer = lambda p: p["decoder"]["quantizer"]
  _assert_same({k: v for k, v in after.items() if k != "decoder"},
               {k: v for k, v in before.items() if k != "decoder"})
  _assert_same(after["decoder"]["backbone"], before["decoder"]["backbone"])
  z_e = setup.codec.apply({"params": after}, batch["wav"], batch["lengths"], train=False).z_e
  for q in range(config.model.num_quantizers):
    layer, old = quantizer(after)[f"layers_{q}"], quantizer(before)[f"layers_{q}"]
    _assert_same(layer["in_project"], old["in_project"])
    assert np.all(np.isfinite(layer["codebook"])) and not np.array_equal(layer["codebook"], old["codebook"])
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    assert 0.5 < rms(layer["codebook"]) / rms(z_e[q]) < 2.0
  data.close()

  config.train.codebook_init = "kmeans"
  with pytest.raises(ValueError, match="codebook_init"):
    cts.make_setup(config)

  # The semantic codec (default 'random') draws its codebooks the same way when asked to.
  config = config_lib.load_config("semantic_codec_tiny", [
      "features.source=synthetic", "train.codebook_init=data", "train.crop_frames=10",
      "train.global_batch_size=2", "model.vocos_num_layers=1", "mesh.fsdp=1"])
  setup = cts.make_setup(config)
  state = cts.create_sharded_state(setup, mesh, config.seed)
  batch = next(iter(codec_data.make_data_iterator(config, setup, mesh, 0, 1)))
  before = jax.device_get(state.params["generator"]["quantizer"]["layers_0"]["codebook"])
  steps = codec_train_step.jit_steps(setup, config, mesh, cts.state_shardings(setup, mesh))
  after = jax.device_get(steps.init_codebooks(state, batch).params["generator"])
  out = setup.codec.apply({"params": after}, batch["features"])
  rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
  assert 0.5 < rms(after["quantizer"]["layers_0"]["codebook"]) / rms(out.vq.z_e[0]) < 2.0
  assert not np.array_equal(after["quantizer"]["layers_0"]["codebook"], before)


def _checkpoint_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def _untimed(history):
  return [{k: v for k, v in h.items() if not k.endswith("_per_second")} for h in history]


@pytest.mark.slow
def test_semantic_codec_trains_on_features_computed_from_audio(tmp_path, speech_dir):
  """Features from 16 kHz crops through a (random, tiny) w2v-BERT inside the step; the codec
  learns to reconstruct them and keeps many codes alive (dead-code restarts)."""
  config = config_lib.load_config("semantic_codec_tiny", [
      "train.steps=40", "train.restart_every=10", "train.crop_frames=25", "mesh.fsdp=2",
      "checkpoint.enabled=False", "logging.tensorboard=False", "logging.log_every_steps=10",
      f"data.train_sources=('{speech_dir}',)"])
  result = train_loop.train(config, str(tmp_path), devices=jax.devices()[:2])
  h = result.history
  assert result.final_step == 40 and len(h) == 40
  first, last = np.mean([x["reconstruction"] for x in h[:3]]), np.mean([x["reconstruction"] for x in h[-3:]])
  assert last < 0.85 * first, (first, last)  # 1.82 -> 1.35 (L1 + MSE; the features are ~unit scale)
  assert sum(x["restarted"] for x in h) > 0  # dead codes were re-drawn
  assert min(x["codes_used"] for x in h[-5:]) > 64, h[-1]  # of 256, in one batch of 8 x 25 frames
  assert [os.path.basename(p) for p in result.exported] == ["semantic_codec.safetensors"]


def test_semantic_codec_crop_gives_whole_feature_frames():
  from metis_jax.frontend import fbank
  for frames in (1, 25, 250):
    samples = cts.semantic_crop(frames)
    assert int(fbank.num_tokens(samples)) == frames and int(fbank.num_frames(samples)) == 2 * frames


def test_codec_configs_are_recognized_and_complete():
  for name, kind in (("acoustic_codec", "acoustic_codec"), ("acoustic_codec_tiny", "acoustic_codec"),
                     ("semantic_codec", "semantic_codec"), ("semantic_codec_tiny", "semantic_codec")):
    config = config_lib.load_config(name)
    assert config.model.kind == kind
    assert train_loop.OBJECTIVES[config.model.kind] is codec_objective.CodecObjective
    for section in ("model", "train", "mesh", "checkpoint", "logging", "data"):
      assert section in config, (name, section)
  assert isinstance(train_loop.make_objective(config_lib.load_config("tiny")), masked_objective.MaskedObjective)
  assert isinstance(train_loop.make_objective(config_lib.load_config("acoustic_codec")), codec_objective.CodecObjective)
  with pytest.raises(ValueError, match="model.kind"):
    train_loop.make_objective(config_lib.load_config("tiny", ["model.kind=wavenet"]))
  tiny = cts.make_setup(config_lib.load_config("semantic_codec_tiny"))
  assert tiny.encoder.hidden_size == tiny.codec_config.hidden_size and tiny.sample_rate == 16000


# ----------------------------------------------------------------------------- the audio pipeline


def _corpus(tmp_path, speech_dir):
  """Three real clips (24 kHz mono, 44.1 kHz stereo), a corrupt file and a silent one."""
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  names = sorted(f for f in os.listdir(speech_dir) if f.startswith("libritts") and f.endswith(".wav"))[:2]
  for n in names:
    shutil.copy(os.path.join(speech_dir, n), root / n)
  shutil.copy(os.path.join(speech_dir, "maskgct_prompt.wav"), root / "sub" / "stereo.wav")
  (root / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
  soundfile.write(str(root / "silent.flac"), np.zeros(24000, np.float32), 24000)
  return str(root)


def _data_cfg(source):
  cfg = config_base.audio_data_config()
  cfg.train_sources = (source,)
  cfg.num_workers = 0
  return cfg


def test_audio_pipeline_skips_bad_files_counts_them_and_resumes_exactly(tmp_path, speech_dir):
  cfg = _data_cfg(_corpus(tmp_path, speech_dir))
  make = lambda: wp.make_local_iterator(cfg, sample_rate=24000, crop=24000, batch_size=2)
  it = make()
  batches = [next(it) for _ in range(3)]
  for b in batches:
    assert b["wav"].shape == (2, 24000) and b["wav"].dtype == np.float32 and b["lengths"].dtype == np.int32
    assert np.all(b["lengths"] == 24000)  # every clip is longer than 1 s
    assert np.all(np.abs(b["wav"]).max(axis=1) > 0.01)  # no silent rows
  # 3 batches of 2 crops read at least 6 good files: one epoch has 3 good and 2 bad ones.
  assert it.skipped_files >= 2
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  again = make()
  again.set_state(state)
  assert again.skipped_files == state["skipped_files"]
  for a, b in zip(after, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a["wav"], b["wav"])
    np.testing.assert_array_equal(a["lengths"], b["lengths"])


def test_audio_pipeline_reads_array_record_shards_and_pads_short_files(tmp_path, speech_dir):
  short = tmp_path / "short.wav"
  soundfile.write(str(short), 0.1 * np.ones(12000, np.float32), 24000)
  files = [str(short)] * 3 + [os.path.join(speech_dir, "metis_vc_prompt.wav")]
  paths = wp.write_audio_shards(files, str(tmp_path / "shards"), files_per_shard=2)
  assert [os.path.basename(p) for p in paths] == ["audio-00000-of-00002.array_record",
                                                  "audio-00001-of-00002.array_record"]
  it = wp.make_local_iterator(_data_cfg(str(tmp_path / "shards")), sample_rate=16000, crop=16000, batch_size=4)
  b = next(it)
  assert b["wav"].shape == (4, 16000)
  assert sorted(b["lengths"].tolist()) == [8000, 8000, 8000, 16000]  # 0.5 s at 16 kHz, padded
  row = int(np.argmin(b["lengths"]))
  assert np.all(b["wav"][row, 8000:] == 0) and np.allclose(b["wav"][row, 100:7900], 0.1, atol=1e-3)
  # Two processes read disjoint halves of an epoch of the shuffled records.
  halves = [wp.element_dataset([str(tmp_path / "shards")], sample_rate=16000, crop=16000, num_epochs=1,
                               process_index=i, process_count=2) for i in (0, 1)]
  assert [len(h) for h in halves] == [2, 2]
  assert sorted(h[j]["length"] for h in halves for j in range(2)) == [8000, 8000, 8000, 16000]
