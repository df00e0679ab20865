"""report.html: the PNG encoder, the page, and that every player and image loads in a browser.

The browser check opens the page in headless Chromium (offline: no network
flags) and reads back the DOM after its inline script marked each `<audio>`
and `<img>` loaded or failed. It skips where no Chromium is installed,
except under CI=true, where it fails (install it: `apt-get install -y chromium`).
"""

import os
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
import soundfile

from metis_jax.inference import evaluation, report_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _decode_png(data: bytes) -> np.ndarray:
  """A minimal PNG reader for the encoder's output (8-bit, filter 0), written from the PNG spec."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, idat, header = 8, b"", None
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat += body
    pos += 12 + length
  width, height, depth, color = header[:4]
  channels = {0: 1, 2: 3}[color]
  assert depth == 8
  raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
  assert (raw[:, 0] == 0).all()
  return raw[:, 1:].reshape(height, width, channels).squeeze()


def test_png_round_trip():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (7, 13, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(report_html.encode_png(rgb)), rgb)
  gray = rng.integers(0, 256, (5, 4), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(report_html.encode_png(gray)), gray)
  with pytest.raises(ValueError):
    report_html.encode_png(rgb.astype(np.float32))


def test_spectrogram_shows_a_tone_at_its_frequency():
  rate = 16000
  t = np.arange(rate) / rate
  img = report_html.spectrogram_image(0.5 * np.sin(2 * np.pi * 1000 * t), rate)
  assert img.shape[0] == report_html.SPECTROGRAM_HEIGHT and img.dtype == np.uint8
  brightness = img.astype(float).sum(-1).mean(1)[::-1]  # per mel bin, low to high
  # the brightest bin is where the 1 kHz tone falls on the mel scale (0-8 kHz over 80 bins)
  mel = lambda f: 1127 * np.log(1 + f / 700)
  expected = mel(1000) / mel(8000) * 81 - 1
  assert abs(int(np.argmax(brightness)) - expected) <= 2


def _page(tmp_path, with_broken=False):
  """A report page for two examples (one failed) with media written by write_media."""
  rate = 24000
  t = np.arange(rate) / rate
  out_wav = tmp_path / "a.wav"
  soundfile.write(out_wav, 0.3 * np.sin(2 * np.pi * 220 * t), rate)
  media = report_html.write_media(report_html.files_dir(str(tmp_path / "report.jsonl")), "a/1", {
      "input": (0.2 * np.random.default_rng(1).standard_normal(rate), rate, None),
      "prompt": (0.3 * np.sin(2 * np.pi * 330 * t), rate, None),
      "output": (soundfile.read(out_wav)[0], rate, str(out_wav)),
      "reference": (0.3 * np.sin(2 * np.pi * 440 * t[:rate // 2]), 16000, None)})
  if with_broken:
    media["reference"] = {"wav": str(tmp_path / "gone.wav"), "png": str(tmp_path / "gone.png")}
  rows = [{"id": "a/1", "index": 0, "task": "se", "status": "ok", "out": str(out_wav), "seconds": 1.0,
           "rtf": 0.5, "si_snr": 3.2, "media": media},
          {"id": "b<x>", "index": 1, "task": "se", "status": "error", "error": "x.wav: no such file"}]
  summary = {"examples": 2, "ok": 1, "failed": 1, "audio_seconds": 1.0, "wall_seconds": 0.5, "rtf": 0.5}
  return report_html.write(str(tmp_path / "report.html"), rows, summary, evaluation.SUMMARY_COLUMNS)


def test_page_is_offline_and_links_relative_media(tmp_path):
  path = _page(tmp_path)
  text = open(path, encoding="utf-8").read()
  assert "http://" not in text and "https://" not in text and "@import" not in text
  assert "<script src" not in text and "<link" not in text
  srcs = re.findall(r"src='([^']+)'", text)
  assert len(srcs) == 8  # 4 players + 4 spectrograms
  for src in srcs:
    assert not os.path.isabs(src) and os.path.exists(os.path.join(tmp_path, src.replace("%2F", "/")))
  assert "b&lt;x&gt;" in text and "x.wav: no such file" in text  # escaped, failure shown
  assert "<th>SI-SNR dB</th>" in text and "3.20" in text


def _browser():
  for name in BROWSERS:
    path = shutil.which(name)
    if path:
      return path
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail("no Chromium on this CI machine: add `apt-get install -y chromium` to .ci/run")
  pytest.skip("no Chromium installed (apt-get install -y chromium) to load report.html")


def _loaded_dom(path):
  command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--allow-file-access-from-files",
             "--mute-audio", "--virtual-time-budget=10000", "--dump-dom", "file://" + os.path.abspath(path)]
  result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def _status(dom):
  box = re.search(r"<span id=\"media-status\"([^>]*)>", dom)
  assert box, dom[:2000]
  attrs = dict(re.findall(r'data-(\w+)="(\d+)"', box.group(1)))
  return {k: int(v) for k, v in attrs.items()}


@pytest.mark.slow  # starts Chromium
def test_every_player_and_image_loads_in_chromium(tmp_path):
  dom = _loaded_dom(_page(tmp_path))
  status = _status(dom)
  assert status == {"loaded": 8, "failed": 0, "total": 8}, status
  assert dom.count('data-status="loaded"') == 8


@pytest.mark.slow  # starts Chromium
def test_the_browser_check_sees_a_missing_file(tmp_path):
  """The check can fail: a page whose reference files are gone reports them."""
  status = _status(_loaded_dom(_page(tmp_path, with_broken=True)))
  assert status["total"] == 8 and status["failed"] == 2 and status["loaded"] == 6, status
