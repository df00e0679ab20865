"""Audio decoding/resampling and the corpus readers (metis_jax.data.audio, readers)."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile

from metis_jax.data import audio
from metis_jax.data import readers
from metis_jax.data import tokenizer


def _tone(freq, seconds, rate, amp=0.3):
  t = np.arange(int(seconds * rate)) / rate
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav_bytes(x, rate, fmt="WAV", subtype=None):
  buf = io.BytesIO()
  soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
  return buf.getvalue()


def test_ssl_frame_count():
  assert tokenizer.num_ssl_frames(16000) == 49
  assert tokenizer.num_ssl_frames(160000) == 499
  assert tokenizer.num_ssl_frames(399) == 0
  assert tokenizer.num_ssl_frames(400) == 1
  assert tokenizer.num_ssl_frames(560) == 1  # F = 2 -> 1 token.
  assert tokenizer.num_ssl_frames(720) == 2  # F = 3 -> 2 tokens.
  np.testing.assert_array_equal(tokenizer.num_ssl_frames(np.array([16000, 160000])), [49, 499])


def test_real_stereo_44k_downmix_and_resample(speech_dir):
  path = os.path.join(speech_dir, "maskgct_prompt.wav")
  data, rate = audio.decode(path)
  assert rate == 44100 and data.shape[1] == 2
  waves, seconds = audio.load(path, (16000, 24000))
  assert seconds == pytest.approx(data.shape[0] / 44100)
  for r in (16000, 24000):
    assert waves[r].dtype == np.float32 and waves[r].ndim == 1
    assert len(waves[r]) == int(np.ceil(data.shape[0] * r / 44100))
  # The down-mix is the channel mean; resampling keeps the speech energy.
  mono = data.mean(axis=1)
  rms_in = np.sqrt(np.mean(mono ** 2))
  rms_out = np.sqrt(np.mean(waves[16000] ** 2))
  assert rms_out == pytest.approx(rms_in, rel=0.05)


def test_resampling_is_band_limited():
  low = audio.resample(_tone(1000, 1.0, 44100), 44100, 16000)
  high = audio.resample(_tone(10000, 1.0, 44100), 44100, 16000)  # Above the 8 kHz Nyquist limit.
  assert len(low) == 16000
  core = slice(1000, -1000)
  assert np.sqrt(np.mean(low[core] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)
  assert np.max(np.abs(high[core])) < 0.003  # Filtered out, not aliased to 6 kHz.


def test_check_waveform_reasons():
  assert audio.check_waveform(np.zeros(0, np.float32)).startswith("empty audio")
  assert audio.check_waveform(np.array([0.1, np.nan], np.float32)).startswith("non-finite")
  assert audio.check_waveform(np.full(100, 1e-5, np.float32)).startswith("silent")
  assert audio.check_waveform(_tone(440, 0.1, 16000)) is None


def test_decode_errors_name_the_file(tmp_path):
  bad = tmp_path / "broken.flac"
  bad.write_bytes(b"fLaC" + os.urandom(64))
  with pytest.raises(audio.AudioError, match="broken.flac"):
    audio.decode(str(bad))


def test_dir_layout_with_sidecars(tmp_path):
  root = tmp_path / "corpus"
  (root / "alice").mkdir(parents=True)
  (root / "bob").mkdir()
  soundfile.write(root / "alice" / "a1.wav", _tone(200, 1.5, 24000), 24000)
  (root / "alice" / "a1.txt").write_text("hello there\n", encoding="utf-8")
  (root / "alice" / "a1.normalized.txt").write_text("Hello there.", encoding="utf-8")
  soundfile.write(root / "bob" / "b1.flac", _tone(300, 2.0, 16000), 16000)
  (root / "bob" / "b1.json").write_text(json.dumps({"text": "bonjour", "language": "fr", "speaker": "robert",
                                                    "dnsmos": 3.5}))
  (root / "bob" / "notes.md").write_text("not audio")
  (root / "bob" / "b2.m4a").write_bytes(b"\x00" * 10)
  units = readers.plan_units(str(root), "auto", files_per_shard=2)
  assert [len(u.paths) for u in units] == [2, 1]
  assert all(u.layout == "dir" for u in units)
  items = [x for u in units for x in readers.read_unit(u)]
  utts = {x.id: x for x in items if isinstance(x, readers.Utterance)}
  skipped = [x for x in items if isinstance(x, readers.Skipped)]
  assert set(utts) == {"alice/a1", "bob/b1"}
  assert utts["alice/a1"].text == "Hello there."  # .normalized.txt wins.
  assert utts["alice/a1"].speaker == "alice"
  assert (utts["bob/b1"].text, utts["bob/b1"].language, utts["bob/b1"].speaker) == ("bonjour", "fr", "robert")
  assert skipped == [readers.Skipped(os.path.join("bob", "b2.m4a"), "unsupported format .m4a")]
  # DNSMOS filter from metadata.
  items = list(readers.read_unit(units[0], min_dnsmos=4.0))
  assert any(isinstance(x, readers.Skipped) and "dnsmos" in x.reason for x in items)


def test_libritts_and_librilight_speakers(tmp_path):
  tts = tmp_path / "libritts" / "260" / "123440"
  tts.mkdir(parents=True)
  soundfile.write(tts / "260_123440_000010_000004.wav", _tone(200, 1.2, 24000), 24000)
  (tts / "260_123440_000010_000004.normalized.txt").write_text("A sentence.")
  [unit] = readers.plan_units(str(tmp_path / "libritts"), "libritts")
  [utt] = list(readers.read_unit(unit))
  assert (utt.speaker, utt.language, utt.text) == ("260", "en", "A sentence.")

  light = tmp_path / "librilight" / "1234" / "some_book"
  light.mkdir(parents=True)
  soundfile.write(light / "chapter_01.flac", _tone(200, 1.2, 16000), 16000)
  (light / "chapter_01.json").write_text(json.dumps({"speaker": "1234", "snr": 12.0}))
  [unit] = readers.plan_units(str(tmp_path / "librilight"), "librilight")
  [utt] = list(readers.read_unit(unit))
  assert (utt.speaker, utt.language, utt.text) == ("1234", "en", "")


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_emilia_tar_layout(tmp_path):
  root = tmp_path / "emilia"
  root.mkdir()
  with tarfile.open(root / "EN-B000000.tar", "w") as tar:
    for i in range(3):
      key = f"EN_B00000_S00000_W{i:06d}"
      _add(tar, key + ".mp3", _wav_bytes(_tone(200 + 50 * i, 1.5, 24000), 24000, "MP3"))
      meta = {"id": key, "wav": key + ".mp3", "text": f"text {i}", "duration": 1.5, "speaker": "EN_B00000_S00000",
              "language": "en", "dnsmos": 3.0 + 0.2 * i}
      _add(tar, key + ".json", json.dumps(meta).encode())
    _add(tar, "EN_orphan.mp3", _wav_bytes(_tone(200, 1.5, 24000), 24000, "MP3"))
    _add(tar, "EN_lonely.json", b'{"id": "EN_lonely", "text": "x"}')
  units = readers.plan_units(str(root))
  assert [u.kind for u in units] == ["tar"] and units[0].layout == "emilia"
  items = list(readers.read_unit(units[0], min_dnsmos=3.1))
  utts = [x for x in items if isinstance(x, readers.Utterance)]
  reasons = {x.file: x.reason for x in items if isinstance(x, readers.Skipped)}
  assert [u.id for u in utts] == ["EN_B00000_S00000_W000001", "EN_B00000_S00000_W000002"]
  assert utts[0].text == "text 1" and utts[0].language == "en" and utts[0].dnsmos == pytest.approx(3.2)
  data, rate = audio.decode(utts[0].audio)
  assert rate == 24000 and abs(data.shape[0] - 36000) < 2000
  assert reasons == {"EN-B000000.tar:EN_B00000_S00000_W000000.mp3": "dnsmos 3.00 < 3.1",
                     "EN-B000000.tar:EN_orphan.mp3": "audio member without its json",
                     "EN-B000000.tar:EN_lonely.json": "json without audio member"}
