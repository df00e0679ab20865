"""`report.html`: a self-contained page to listen to and look at a decode run.

Beside `report.jsonl`: a summary table (per task: examples, means of the
measures), the outputs' measures next to the inputs' (the baseline, where the
rows have `<measure>_input`), then per example its `<audio>` players (input, prompt, output,
reference), their log-mel spectrograms and its measures. Audio and images
are files in `<report>_files/` (relative links), spectrograms are PNGs
written by the small encoder here (zlib, no plotting library). The page
has no external script, style sheet or font, so it opens offline; its one
inline script marks each player and image as loaded or failed
(`data-status`) and counts them in `#media-status`.
"""

import html
import json
import os
import struct
import zlib
from typing import Optional, Sequence

import numpy as np

MEDIA_ORDER = ("input", "prompt", "output", "reference")
SPECTROGRAM_HEIGHT = 80  # mel bins, one pixel row each (low frequencies at the bottom)


# ----------------------------------------------------------------------------- PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
  """`[height, width, 3]` (RGB) or `[height, width]` (gray) uint8 -> PNG file bytes (8-bit,
  no filtering, zlib-compressed)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
    raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
  height, width = image.shape[:2]
  if height < 1 or width < 1:
    raise ValueError(f"empty image {image.shape}")
  color = 2 if image.ndim == 3 else 0
  rows = image.reshape(height, -1)
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row
  header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
          + _chunk(b"IEND", b""))


def _colormap(x: np.ndarray) -> np.ndarray:
  """[0, 1] -> RGB uint8 along dark blue, magenta, orange, pale yellow (a perceptual ramp)."""
  stops = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                    [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float64)
  pos = np.clip(x, 0, 1) * (len(stops) - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, len(stops) - 1)
  frac = (pos - lo)[..., None]
  return np.round(stops[lo] * (1 - frac) + stops[hi] * frac).astype(np.uint8)


def spectrogram_image(wav: np.ndarray, sample_rate: int, max_width: int = 1200) -> np.ndarray:
  """`[80, frames]` RGB uint8 log-mel image (80 dB range below the peak); time columns are
  averaged down to at most `max_width`."""
  from metis_jax.inference import evaluation  # pylint: disable=g-import-not-at-top
  hop = max(1, sample_rate // 100)
  mel = evaluation.log_mel(np.asarray(wav, np.float32), sample_rate, n_fft=2 * hop * 2, hop=hop,
                           num_mels=SPECTROGRAM_HEIGHT)  # [frames, 80], natural log power
  db = 10.0 / np.log(10.0) * mel
  db = np.clip((db - (db.max() - 80.0)) / 80.0, 0.0, 1.0)
  frames = db.shape[0]
  if frames > max_width:
    edges = np.linspace(0, frames, max_width + 1).astype(int)
    db = np.stack([db[a:max(b, a + 1)].mean(0) for a, b in zip(edges[:-1], edges[1:])])
  return _colormap(db.T[::-1])


def write_spectrogram(wav: np.ndarray, sample_rate: int, path: str) -> str:
  with open(path, "wb") as f:
    f.write(encode_png(spectrogram_image(wav, sample_rate)))
  return path


# ----------------------------------------------------------------------------- media of an example


def files_dir(report_path: str) -> str:
  """`<report without extension>_files`, where an example's media go."""
  return os.path.splitext(report_path)[0] + "_files"


def write_media(directory: str, example_id: str, audio: dict) -> dict:
  """Writes each `name -> (waveform, rate, wav path or None)` as a wav (unless it has a path) and
  its spectrogram PNG; returns `name -> {"wav": path, "png": path}`."""
  import soundfile  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in example_id)
  out = {}
  for name in MEDIA_ORDER:
    if audio.get(name) is None:
      continue
    wav, rate, path = audio[name]
    wav = np.asarray(wav, np.float32)
    if not len(wav):
      continue
    if path is None:
      path = os.path.join(directory, f"{safe}_{name}.wav")
      soundfile.write(path, np.clip(wav, -1.0, 1.0), rate, subtype="PCM_16")
    out[name] = {"wav": path, "png": write_spectrogram(wav, rate, os.path.join(directory, f"{safe}_{name}.png"))}
  return out


# ----------------------------------------------------------------------------- the page

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.ex{background:#fff;border:1px solid #ddd;margin:1em 0;padding:.8em}
.media{display:flex;flex-wrap:wrap;gap:1em}.media figure{margin:0}.media img{display:block;height:80px;
max-width:600px;image-rendering:pixelated}.err{color:#b00}.ok{color:#070}code{font-size:90%}
"""

_SCRIPT = """
(function(){
  var items=[].slice.call(document.querySelectorAll('audio[data-media],img[data-media]'));
  var box=document.getElementById('media-status');
  function update(){
    var ok=0,bad=0;items.forEach(function(e){var s=e.getAttribute('data-status');
      if(s==='loaded')ok++;else if(s==='error')bad++;});
    box.textContent='media: '+ok+' of '+items.length+' loaded'+(bad?', '+bad+' failed':'');
    box.setAttribute('data-loaded',ok);box.setAttribute('data-failed',bad);
    box.setAttribute('data-total',items.length);
  }
  items.forEach(function(e){
    function mark(s){e.setAttribute('data-status',s);update();}
    if(e.tagName==='IMG'){
      if(e.complete){mark(e.naturalWidth>0?'loaded':'error');}
      e.addEventListener('load',function(){mark(e.naturalWidth>0?'loaded':'error');});
      e.addEventListener('error',function(){mark('error');});
    }else{
      if(e.readyState>=1){mark('loaded');}
      e.addEventListener('loadedmetadata',function(){mark('loaded');});
      e.addEventListener('error',function(){mark('error');},true);
      var src=e.querySelector('source');if(src)src.addEventListener('error',function(){mark('error');});
      e.load();
    }
  });
  update();
})();
"""


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (list, dict)):
    return html.escape(json.dumps(value, ensure_ascii=False))
  return html.escape(str(value))


def _rel(path: str, base: str) -> str:
  return os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")


def _baseline_table(rows: Sequence[dict]) -> list:
  """The measures of the outputs next to those of the inputs themselves (noisy input, mixture,
  perturbed source) against the same references: the baseline a model must beat."""
  from metis_jax.inference import evaluation  # pylint: disable=g-import-not-at-top
  entries = evaluation.baseline_rows(rows)
  if not entries:
    return []
  out = ["<h2>Against the input (baseline)</h2><table id='baseline'><tr><th class='l'>task</th>"
         "<th class='l'>measure</th><th>n</th><th>input</th><th>output</th><th>output &minus; input</th>"
         "<th class='l'>output better</th></tr>"]
  for e in entries:
    fmt = e["format"]
    verdict = "<span class='ok'>yes</span>" if e["better"] else "<span class='err'>no</span>"
    out.append(f"<tr><td class='l'>{html.escape(e['group'])}</td><td class='l'>{html.escape(e['measure'])}</td>"
               f"<td>{e['n']}</td><td>{fmt.format(e['input'])}</td><td>{fmt.format(e['output'])}</td>"
               f"<td>{'+' if e['delta'] >= 0 else ''}{fmt.format(e['delta'])}</td><td class='l'>{verdict}</td></tr>")
  out.append("</table>")
  return out


def render(rows: Sequence[dict], summary: dict, columns: Sequence[tuple], base_dir: str,
           title: str = "metis_jax decode report") -> str:
  """The page for report rows (each may carry `media`: name -> {wav, png}); links are relative
  to `base_dir` (the folder of the page)."""
  from urllib.parse import quote  # pylint: disable=g-import-not-at-top
  ok = [r for r in rows if r.get("status") == "ok"]
  present = [c for c in columns if any(isinstance(r.get(c[0]), (int, float)) for r in ok)]
  groups: dict = {}
  for r in ok:
    groups.setdefault(str(r.get("task", "")), []).append(r)
  out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
         f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p>{summary.get('ok', len(ok))} of {summary.get('examples', len(rows))} examples generated, "
         f"{_fmt(float(summary.get('audio_seconds', 0.0)))} s of audio in "
         f"{_fmt(float(summary.get('wall_seconds', 0.0)))} s"
         + (f" (RTF {_fmt(float(summary['rtf']))})" if summary.get("rtf") else "") + ". "
         "<span id='media-status'>media: not checked (scripts off)</span></p>",
         "<h2>Summary</h2><table><tr><th class='l'>task</th><th>n</th>"
         + "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in present) + "</tr>"]
  for name, members in groups.items():
    cells = []
    for key, _, fmt in present:
      values = [r[key] for r in members if isinstance(r.get(key), (int, float))]
      cells.append(f"<td>{fmt.format(float(np.mean(values))) if values else '-'}</td>")
    out.append(f"<tr><td class='l'>{html.escape(name)}</td><td>{len(members)}</td>{''.join(cells)}</tr>")
  out.append("</table>")
  out.extend(_baseline_table(rows))
  failed = [r for r in rows if r.get("status") != "ok"]
  if failed:
    out.append(f"<p class='err'>failed: {len(failed)}</p>")
  out.append("<h2>Examples</h2>")
  skip = {"media", "id", "status", "error", "out"}
  for r in rows:
    ex_id = html.escape(str(r.get("id", "")))
    out.append(f"<div class='ex' id='ex-{ex_id}'><h3>{ex_id} <small>({html.escape(str(r.get('task', '')))})"
               "</small></h3>")
    if r.get("status") != "ok":
      out.append(f"<p class='err'>error: {html.escape(str(r.get('error', '')))}</p></div>")
      continue
    media = r.get("media") or {}
    out.append("<div class='media'>")
    for name in MEDIA_ORDER:
      if name not in media:
        continue
      wav = quote(_rel(media[name]["wav"], base_dir))
      png = quote(_rel(media[name]["png"], base_dir))
      out.append(f"<figure><figcaption>{name}</figcaption>"
                 f"<audio controls preload='metadata' data-media='{name}'><source src='{wav}' type='audio/wav'>"
                 f"</audio><img data-media='{name}' src='{png}' alt='{name} spectrogram'></figure>")
    out.append("</div><table>")
    for key, value in r.items():
      if key not in skip and value is not None:
        out.append(f"<tr><th class='l'>{html.escape(str(key))}</th><td class='l'>{_fmt(value)}</td></tr>")
    out.append("</table></div>")
  out.append(f"<script>{_SCRIPT}</script></body></html>")
  return "\n".join(out)


def write(path: str, rows: Sequence[dict], summary: dict, columns: Sequence[tuple],
          title: Optional[str] = None) -> str:
  """Writes the page to `path` (links relative to its folder); returns the path."""
  base = os.path.dirname(os.path.abspath(path))
  os.makedirs(base, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(render(rows, summary, columns, base, title or "metis_jax decode report"))
  return path
