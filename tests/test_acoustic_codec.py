"""Acoustic codec: parity with the original, iSTFT, shapes, padding, chunking, conversion."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax.models import acoustic_codec as ac
from metis_jax.conversion import acoustic_codec as conv
from metis_jax.conversion import common
from metis_jax.nn import vocos

HOP = 480


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@functools.lru_cache(maxsize=None)
def _load(parity_dir):
  d = os.path.join(parity_dir, "acoustic_codec")
  cfg, params = conv.load_amphion(os.path.join(d, "encoder.safetensors"), os.path.join(d, "decoder.safetensors"))
  return (cfg, params, dict(np.load(os.path.join(d, "inputs.npz"))), dict(np.load(os.path.join(d, "outputs.npz"))))


@functools.lru_cache(maxsize=None)
def _codec(parity_dir):
  cfg, params, _, _ = _load(parity_dir)
  return ac.AcousticCodecInference(cfg, params)


@pytest.mark.parity
def test_reproduces_original(parity_dir):
  cfg, params, inputs, expected = _load(parity_dir)
  assert cfg.up_ratios == (3, 4, 5, 8) and cfg.num_quantizers == 12 and cfg.latent_dim == 32
  model = ac.AcousticCodec(cfg)
  v = {"params": params}
  wav = jnp.asarray(inputs["wav"])
  latent, _ = jax.jit(functools.partial(model.apply, method=ac.AcousticCodec.encode_latent))(v, wav)
  assert _rel(jnp.transpose(latent, (0, 2, 1)), expected["latent"]) < 1e-4
  codec = _codec(parity_dir)
  np.testing.assert_array_equal(np.asarray(codec.encode(wav)), expected["codes_from_wav"])
  emb = jax.jit(functools.partial(model.apply, method=ac.AcousticCodec.embed_codes))(v, jnp.asarray(inputs["codes"]))
  assert _rel(jnp.transpose(emb, (0, 2, 1)), expected["emb_from_codes"]) < 1e-4
  wav_rec = codec.decode(inputs["codes"])
  assert wav_rec.shape == (2, 20 * HOP)
  assert _rel(wav_rec[:, None], expected["wav_rec"]) < 1e-4


def _numpy_istft(spec, n_fft, hop):
  """Reference: per-frame irfft * periodic Hann, loop overlap-add, "same" trim, envelope."""
  batch, frames, _ = spec.shape
  win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  length = (frames - 1) * hop + n_fft
  y = np.zeros((batch, length))
  env = np.zeros(length)
  for t in range(frames):
    y[:, t * hop:t * hop + n_fft] += np.fft.irfft(spec[:, t], n_fft) * win
    env[t * hop:t * hop + n_fft] += win ** 2
  pad = (n_fft - hop) // 2
  return y[:, pad:length - pad] / env[pad:length - pad]


@pytest.mark.parametrize("n_fft,hop", [(1920, 480), (64, 16), (50, 20)])
def test_istft_matches_numpy_reference(n_fft, hop):
  rng = np.random.default_rng(0)
  frames = 9
  spec = rng.standard_normal((2, frames, n_fft // 2 + 1)) + 1j * rng.standard_normal((2, frames, n_fft // 2 + 1))
  spec[..., 0] = spec[..., 0].real  # DC (and Nyquist) are real for a real signal
  if n_fft % 2 == 0:
    spec[..., -1] = spec[..., -1].real
  got = vocos.istft_same(jnp.asarray(spec, jnp.complex64), n_fft, hop, jnp.asarray(vocos.hann_window(n_fft)))
  assert got.shape == (2, frames * hop)
  ref = _numpy_istft(spec, n_fft, hop)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_istft_inverts_a_same_padded_stft():
  """A signal's "same"-padded STFT (scipy, periodic Hann) goes back to the signal, edges included."""
  import scipy.signal
  n_fft, hop, frames = 1920, 480, 12
  x = np.random.default_rng(1).standard_normal(frames * hop)
  pad = (n_fft - hop) // 2
  win = scipy.signal.get_window("hann", n_fft)  # periodic
  frames_td = np.lib.stride_tricks.sliding_window_view(np.pad(x, (pad, pad)), n_fft)[::hop][:frames]
  spec = np.fft.rfft(frames_td * win, axis=-1)
  y = vocos.istft_same(jnp.asarray(spec[None], jnp.complex64), n_fft, hop, jnp.asarray(win, jnp.float32))
  np.testing.assert_allclose(np.asarray(y[0]), x, atol=2e-5)


@pytest.mark.slow
def test_encode_decode_shapes_and_quantizer_dropout(parity_dir):
  codec = _codec(parity_dir)
  _, _, inputs, expected = _load(parity_dir)
  n = inputs["wav"].shape[1]
  assert n % HOP == 0
  wav = np.concatenate([inputs["wav"], inputs["wav"][:, :HOP - 1]], axis=1)  # + 479 samples
  codes = codec.encode(wav)  # the partial frame is dropped: N // 480 frames
  assert codes.shape == (2, n // HOP, 12) and codes.dtype == jnp.int32
  np.testing.assert_array_equal(codes, expected["codes_from_wav"])
  assert codec.decode(codes).shape == (2, n)
  assert codec.decode(codes[:, :20, :3]).shape == (2, 20 * HOP)  # the first 3 layers only
  # Training forward: quantizer dropout over a batch of 4: items 0, 1 sum 1..12 layers, 2, 3 all 12.
  cfg, params, _, _ = _load(parity_dir)
  model = ac.AcousticCodec(cfg)
  wav = jnp.asarray(np.tile(inputs["wav"][:, :20 * HOP], (2, 1)))
  fwd = jax.jit(lambda p, key, train: model.apply({"params": p}, wav, train=train, rngs={"dropout": key}),
                static_argnums=2)
  ref = fwd(params, jax.random.key(0), False)
  dropped = set()
  for seed in range(6):
    out = fwd(params, jax.random.key(seed), True)
    assert out.wav.shape == (4, 20 * HOP) and out.codes.shape == (4, 20, 12)
    np.testing.assert_array_equal(out.codes, ref.codes)  # every layer is computed
    np.testing.assert_allclose(out.wav[2:], ref.wav[2:], rtol=1e-5, atol=1e-6)
    dropped.update(b for b in (0, 1) if not np.allclose(out.wav[b], ref.wav[b], rtol=1e-5, atol=1e-6))
  assert dropped == {0, 1}
  assert float(out.commit_loss) > 0 and float(out.codebook_loss) > 0
  kept = ac.vq.dropout_num_quantizers(jax.random.key(0), 4000, 12, 0.5)
  assert set(np.asarray(kept[:2000]).tolist()) == set(range(1, 13)) and (kept[2000:] == 12).all()


@pytest.mark.slow
def test_padded_batch_equals_items_alone(parity_dir):
  codec = _codec(parity_dir)
  _, _, inputs, expected = _load(parity_dir)
  wav = np.array(inputs["wav"])  # 53 frames
  wav[0, 25 * HOP:] = 5.0  # junk in the padding must not leak
  codes = codec.encode(wav, lengths=[25 * HOP + 100, wav.shape[1]])  # item 0 cropped to 25 frames
  alone = codec.encode(inputs["wav"][:1, :25 * HOP])
  np.testing.assert_array_equal(codes[0, :25], alone[0])
  assert (np.asarray(codes[0, 25:]) == 0).all()
  np.testing.assert_array_equal(codes[1], expected["codes_from_wav"][1])
  # Decoding with frame lengths: item 0 equals its own decode, then silence.
  junk = np.array(codes)
  junk[0, 25:] = 7
  out = codec.decode(junk, frame_lengths=[25, 53])
  scale = float(jnp.abs(out).max())
  np.testing.assert_allclose(out[0, :25 * HOP], codec.decode(alone)[0], rtol=1e-4, atol=1e-4 * scale)
  assert float(jnp.abs(out[0, 25 * HOP:]).max()) == 0.0
  np.testing.assert_allclose(out[1], codec.decode(expected["codes_from_wav"])[1], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_chunked_encoding_equals_whole(parity_dir):
  codec = _codec(parity_dir)
  _, _, inputs, _ = _load(parity_dir)
  wav = np.concatenate([inputs["wav"][0], inputs["wav"][1]])[None]  # 106 frames
  whole = np.asarray(codec.encode(wav))
  chunked = codec.encode_long(wav, chunk_frames=20)  # windows of 20 + 2 * 10 frames
  assert chunked.shape == whole.shape == (1, 106, 12)
  np.testing.assert_array_equal(chunked, whole)
  # Without context, frames near the chunk edges change: the context is what makes it exact.
  assert (codec.encode_long(wav, chunk_frames=20, context_frames=0) != whole).any()


def test_chunked_decoding_equals_whole_away_from_joins(parity_dir):
  codec = _codec(parity_dir)
  frames, chunk = 150, 48
  codes = np.random.default_rng(0).integers(0, 64, (1, frames, 12))
  whole = np.asarray(codec.decode(codes))[0]
  scale = np.abs(whole).max()
  # Overlap 4x the decoder's receptive field: every window is used only where it
  # is beyond its receptive field from its own edges, so it equals whole decoding.
  rf = ac.decoder_receptive_field(codec.config)
  assert rf == 3 + 3 * 2 + 4
  exact = codec.decode_long(codes, chunk_frames=chunk, overlap_frames=4 * rf - 12)[0]
  np.testing.assert_allclose(exact, whole, atol=1e-4 * scale)
  # A short overlap: exact away from the joins, bounded and seamless at them.
  overlap = 8
  approx = codec.decode_long(codes, chunk_frames=chunk, overlap_frames=overlap)[0]
  assert approx.shape == whole.shape
  err = np.abs(approx - whole)
  starts = list(range(0, frames - chunk, chunk - overlap)) + [frames - chunk]
  near = np.zeros(frames, bool)
  for s in starts[1:]:
    near[max(s - rf, 0):s + overlap + rf] = True  # frames any window edge can reach
  near_s = np.repeat(near, HOP)
  assert err[~near_s].max() < 1e-4 * scale
  assert 1e-4 * scale < err[near_s].max() < 0.25 * scale
  # No seam: sample-to-sample steps at the joins stay within what the signal does anyway.
  step = np.abs(np.diff(approx))
  assert step[near_s[1:]].max() < 1.5 * np.abs(np.diff(whole)).max()


def _random_params(cfg, seed=0):
  leaves, treedef = jax.tree_util.tree_flatten(ac.abstract_params(ac.AcousticCodec(cfg)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(treedef, [rng.standard_normal(x.shape).astype(np.float32) for x in leaves])


def _tiny(**kw):
  args = dict(encoder_dim=2, up_ratios=(2, 3), latent_dim=6, num_quantizers=3, codebook_size=8, codebook_dim=2,
              vocos_dim=4, vocos_intermediate_dim=6, vocos_num_layers=2, n_fft=24, hop_size=6)
  return ac.AcousticCodecConfig(**{**args, **kw})


@pytest.mark.parametrize("weight_norm,scan", [(False, True), (True, False)])
def test_conversion_round_trip_is_exact(weight_norm, scan, tmp_path):
  cfg = _tiny(weight_norm=weight_norm, scan_layers=scan)
  params = _random_params(cfg)
  enc, dec = conv.params_to_amphion(params, cfg)
  assert enc["block.2.block.4.weight_v"].shape == (8, 4, 6)  # stride 3: k 6
  assert enc["block.1.block.0.block.0.alpha"].shape == (1, 2, 1)
  assert dec[conv.WINDOW_KEY].shape == (24,)
  back = conv.amphion_to_params(enc, dec, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, back)
  conv.save_amphion(str(tmp_path / "e.safetensors"), str(tmp_path / "d.safetensors"), params, cfg)
  cfg2, params2 = conv.load_amphion(str(tmp_path / "e.safetensors"), str(tmp_path / "d.safetensors"),
                                    weight_norm=weight_norm, scan_layers=scan)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_wrong_file_is_refused_with_the_bad_keys(parity_dir):
  d = os.path.join(parity_dir, "acoustic_codec")
  cfg, _, _, _ = _load(parity_dir)
  enc, _ = common.load_safetensors(os.path.join(d, "encoder.safetensors"))
  dec, _ = common.load_safetensors(os.path.join(d, "decoder.safetensors"))
  bad = dict(enc)
  del bad["block.3.block.1.block.2.alpha"]
  bad["block.7.weight"] = np.zeros(1, np.float32)
  bad["block.6.weight_v"] = np.zeros((32, 128, 5), np.float32)
  with pytest.raises(common.ConversionError) as e:
    conv.amphion_to_params(bad, dec, cfg, ("bad_encoder", "decoder"))
  msg = str(e.value)
  assert msg.startswith("bad_encoder")
  assert "block.3.block.1.block.2.alpha" in msg and "block.7.weight" in msg
  assert "block.6.weight_v: file (32, 128, 5), model (32, 128, 3)" in msg
  # Swapped files are refused (the decoder where the encoder goes).
  with pytest.raises(common.ConversionError, match="missing keys"):
    conv.amphion_to_params(dec, enc, cfg)
  # A wrong synthesis window is refused.
  wrong = dict(dec, **{conv.WINDOW_KEY: np.hanning(1920).astype(np.float32)})  # symmetric Hann
  with pytest.raises(common.ConversionError, match="periodic Hann"):
    conv.amphion_to_params(enc, wrong, cfg)
  # Fewer quantizers than the config.
  with pytest.raises(common.ConversionError, match="quantizer.quantizers.11"):
    conv.amphion_to_params(None, {k: v for k, v in dec.items() if ".11." not in k}, cfg)


def test_released_sizes():
  cfg = ac.AcousticCodecConfig()
  shapes = ac.abstract_params(ac.AcousticCodec(cfg))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t))
  assert abs(count(shapes["encoder"]) / 1e6 - 42.5) < 0.1, count(shapes["encoder"])
  assert abs(count(shapes["decoder"]) / 1e6 - 128) < 1.5, count(shapes["decoder"])
  enc, dec = conv.expected_shapes(cfg)
  assert enc["block.4.block.4.weight_v"] == (1536, 768, 16)
  assert enc["block.6.weight_v"] == (256, 1536, 3)
  assert dec["model.backbone.convnext.29.pwconv1.weight"] == (4096, 512)
  assert dec["model.head.out.weight"] == (1922, 512)
  assert dec["quantizer.quantizers.11.codebook.weight"] == (1024, 8)
  assert ac.encoder_receptive_field(cfg) < 10 * HOP


@pytest.mark.slow
def test_gan_steps_lower_the_mel_loss(speech_dir):
  """A micro codec (hop 6) with one period and one spectrogram discriminator: 25 generator +
  discriminator steps on one batch of real speech (4x louder than recorded, so that the level,
  the first thing a fresh decoder must learn, is off by a lot) lower the mel loss."""
  from metis_jax import config_base
  from metis_jax.training import codec_state as cts, codec_step as codec_train_step
  from metis_jax.parallel import mesh as mesh_lib
  from metis_jax.data import waveform_pipeline
  config = config_base.acoustic_codec_config()  # Adam (0.5, 0.9), LSGAN, mel 10, adv 2, feature matching 2
  config.model.update(dict(encoder_dim=8, up_ratios=(6,), latent_dim=16, num_quantizers=2, codebook_size=16,
                           codebook_dim=4, vocos_dim=32, vocos_intermediate_dim=32, vocos_num_layers=1,
                           n_fft=24, hop_size=6))
  t = config.train
  t.learning_rate, t.warmup_steps, t.global_batch_size, t.crop_seconds = 3e-3, 0, 4, 0.05
  t.mpd_periods, t.mrd_ffts, t.disc_channels, t.disc_max_channels = (2,), (64,), 4, 16
  t.mel_windows, t.mel_bins = (32, 128), (5, 20)
  config.mesh.fsdp = 1
  config.data.train_sources, config.data.num_workers = (speech_dir,), 0
  setup = cts.make_setup(config)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:1])
  shardings = cts.state_shardings(setup, mesh)
  state = cts.create_sharded_state(setup, mesh, 0)
  steps = codec_train_step.jit_steps(setup, config, mesh, shardings)
  crops = next(waveform_pipeline.make_local_iterator(config.data, sample_rate=24000, crop=setup.crop, batch_size=4))
  batch = {"wav": 4 * jnp.asarray(crops["wav"]), "lengths": jnp.asarray(crops["lengths"])}
  disc_before = jax.tree_util.tree_map(np.asarray, state.params["discriminator"])
  mels = []
  for _ in range(25):
    state, m, fake = steps.generator(state, batch)
    state, d = steps.discriminator(state, batch, fake)
    mels.append(float(m["mel"]))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(d["disc_loss"]))
  assert setup.crop == 1200 and fake.shape == (4, 1200) and int(state.step) == 25
  assert np.mean(mels[-3:]) < 0.8 * mels[0], mels
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != np.asarray(b))), disc_before,
                                   state.params["discriminator"])
  assert all(jax.tree_util.tree_leaves(changed))  # the discriminator step trains every weight


@pytest.mark.slow
def test_reconstruction_report(parity_dir, speech_dir):
  from metis_jax.inference import codec_report
  d = os.path.join(parity_dir, "acoustic_codec")
  clip = sorted(f for f in os.listdir(speech_dir) if f.startswith("libritts") and f.endswith(".wav"))[0]
  rows = codec_report.main(["--encoder", os.path.join(d, "encoder.safetensors"), "--decoder",
                            os.path.join(d, "decoder.safetensors"), "--layers", "4,12",
                            "--wav", os.path.join(speech_dir, clip)])
  assert [r[1] for r in rows] == [4, 12]
  for _, _, m in rows:
    assert np.isfinite(m["mel"]) and np.isfinite(m["si_snr"])
  # The metrics themselves: a perfect reconstruction and a scaled one are perfect for SI-SNR.
  audio = codec_report.read_audio(os.path.join(speech_dir, clip))
  same = codec_report.metrics(0.5 * audio, audio)
  assert same["si_snr"] > 60 and same["mel"] > 0.2  # mel is not scale-invariant
  assert codec_report.metrics(audio, audio)["mel"] < 1e-6
  noisy = codec_report.metrics(audio + 0.1 * np.random.default_rng(0).standard_normal(len(audio)), audio)
  assert noisy["si_snr"] < 10


def test_report_refuses_a_damaged_codec_file_with_one_error_line(tmp_path):
  bad = tmp_path / "decoder.safetensors"
  bad.write_bytes(b"not a safetensors file")
  out = subprocess.run([sys.executable, "-m", "metis_jax.codec_report", "--encoder", str(bad), "--decoder",
                        str(bad), "--wav", str(tmp_path / "x.wav")], capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], out.stderr[-2000:]
  assert "not a readable safetensors file" in lines[0]


@pytest.mark.slow
def test_report_cross_mel_tells_a_collapsed_codec_from_a_working_one(speech_dir):
  """mel_x (reconstruction vs the next file's audio): a perfect codec scores far from its mel; a
  codec whose output ignores its input scores the same in the mean."""
  from metis_jax.inference import codec_report
  clips = sorted(f for f in os.listdir(speech_dir) if f.endswith(".wav"))[:3]
  audios = [codec_report.read_audio(os.path.join(speech_dir, c))[:24000] for c in clips]

  def rows_for(recs):
    rows = [(c, 12, codec_report.metrics(r[12], a)) for c, r, a in zip(clips, recs, audios)]
    codec_report.add_cross_mel(rows, audios, recs)
    return [m for _, _, m in rows]

  perfect = rows_for([{12: a} for a in audios])
  assert all(m["mel"] < 1e-6 and m["mel_x"] > 0.2 for m in perfect)
  constant = rows_for([{12: audios[0]} for _ in audios])  # the same output for every input
  np.testing.assert_allclose(np.mean([m["mel"] for m in constant]), np.mean([m["mel_x"] for m in constant]),
                             rtol=1e-5)
  assert "mel_x" in codec_report.format_table([(c, 12, m) for c, m in zip(clips, perfect)])
