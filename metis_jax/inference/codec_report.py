r"""Reconstruction report of the acoustic codec: encode -> decode each file and compare.

  python -m metis_jax.codec_report --encoder acoustic_codec/model.safetensors \
      --decoder acoustic_codec/model_1.safetensors --wav ../shared/data/speech/*.wav
  python -m metis_jax.codec_report --checkpoint /tmp/codec_tiny --layers 1,4,12 --wav a.wav b.wav

`--checkpoint DIR` reads `DIR/encoder.safetensors` and `DIR/decoder.safetensors`
(what `metis_jax.codec_train` writes). Audio is down-mixed and resampled to
24 kHz; files longer than `--chunk_seconds` go through the chunked
encoder/decoder. Per file and number of RVQ layers it prints:

  mel    mean over 7 scales (windows 32..2048) of the log10-mel L1 distance
         (lower is better; the training mel loss divided by 7)
  SI-SNR scale-invariant signal-to-noise ratio in dB (higher is better)
  STOI   short-time objective intelligibility, 0..1, if `pystoi` is installed
  PESQ   wide-band PESQ (16 kHz), 1..4.5, if `pesq` is installed
  mel_x  (two files or more) mel distance of the reconstruction to the NEXT
         file's audio (first 10 s of each): a codec that ignores its input
         (a collapsed quantizer) scores about the same as its mel; a working
         codec scores far lower on its own audio

STOI/PESQ are optional: `pip install pystoi pesq` (pystoi==0.4.1, pesq==0.0.4).
"""

import glob
import os

import numpy as np

from metis_jax import cli_support
from metis_jax.models import acoustic_codec as ac
from metis_jax.inference import evaluation
from metis_jax.inference import model_loading
from metis_jax.nn import spectral

try:  # optional metrics
  import pystoi
except ImportError:  # pragma: no cover
  pystoi = None
try:
  import pesq as pesq_lib
except ImportError:  # pragma: no cover
  pesq_lib = None


def read_audio(path: str, sample_rate: int = ac.SAMPLE_RATE) -> np.ndarray:
  """Mono float32 at `sample_rate` (down-mixed, polyphase-resampled)."""
  import math

  import scipy.signal
  import soundfile as sf
  audio, sr = sf.read(path, dtype="float32", always_2d=True)
  audio = audio.mean(axis=1)
  if sr != sample_rate:
    g = math.gcd(sr, sample_rate)
    audio = scipy.signal.resample_poly(audio, sample_rate // g, sr // g).astype(np.float32)
  return audio


def metrics(estimate: np.ndarray, reference: np.ndarray, sample_rate: int = ac.SAMPLE_RATE) -> dict:
  """mel, si_snr (and stoi, pesq when available) of an estimate against its reference."""
  n = min(len(estimate), len(reference))
  est, ref = np.asarray(estimate[:n], np.float64), np.asarray(reference[:n], np.float64)
  out = {"mel": spectral.mel_distance(est, ref, sample_rate), "si_snr": evaluation.si_snr(est, ref)}
  if pystoi is not None:
    out["stoi"] = float(pystoi.stoi(ref, est, sample_rate, extended=False))
  if pesq_lib is not None:
    import scipy.signal
    r16 = scipy.signal.resample_poly(ref, 2, 3) if sample_rate == 24000 else ref
    e16 = scipy.signal.resample_poly(est, 2, 3) if sample_rate == 24000 else est
    try:
      out["pesq"] = float(pesq_lib.pesq(16000, r16, e16, "wb"))
    except Exception:  # pesq raises on silence / too-short input
      out["pesq"] = float("nan")
  return out


def evaluate(codec: ac.AcousticCodecInference, audio: np.ndarray, layers=(12,), chunk_seconds: float = 30.0,
             reconstructions: dict | None = None) -> dict:
  """{n_layers: metrics} for one mono 24 kHz clip (`reconstructions`, if given, gets {n: audio})."""
  hop, sr = codec.config.hop_size, codec.config.sample_rate
  audio = audio[:len(audio) // hop * hop]
  chunk_frames = int(chunk_seconds * sr) // hop
  if len(audio) // hop > chunk_frames:
    codes = codec.encode_long(audio[None], chunk_frames=chunk_frames)
  else:
    codes = np.asarray(codec.encode(audio[None]))
  results = {}
  for n in layers:
    sub = codes[..., :n]
    if sub.shape[1] > chunk_frames:
      rec = codec.decode_long(sub, chunk_frames=chunk_frames)[0]
    else:
      rec = np.asarray(codec.decode(sub))[0]
    results[n] = metrics(rec, audio, sr)
    if reconstructions is not None:
      reconstructions[n] = rec
  return results


CROSS_SECONDS = 10.0


def add_cross_mel(rows: list[tuple[str, int, dict]], audios: list[np.ndarray], recs: list[dict],
                  sample_rate: int = ac.SAMPLE_RATE) -> None:
  """Adds 'mel_x' to each row: file i's reconstruction against file i+1's audio (cyclic, first 10 s)."""
  if len(audios) < 2:
    return
  n_max = int(CROSS_SECONDS * sample_rate)
  by_file = {}
  for name, n, m in rows:
    by_file.setdefault(name, []).append((n, m))
  for i, entries in enumerate(by_file.values()):
    other = audios[(i + 1) % len(audios)]
    for n, m in entries:
      rec = recs[i][n]
      k = min(len(rec), len(other), n_max)
      m["mel_x"] = spectral.mel_distance(rec[:k], other[:k], sample_rate)


def format_table(rows: list[tuple[str, int, dict]]) -> str:
  keys = ["mel", "si_snr"] + [k for k in ("stoi", "pesq", "mel_x") if any(k in r[2] for r in rows)]
  lines = [f"{'file':<40}{'layers':>7}" + "".join(f"{k:>9}" for k in keys)]
  lines.append("-" * len(lines[0]))
  for name, n, m in rows:
    lines.append(f"{name[:40]:<40}{n:>7}" + "".join(f"{m.get(k, float('nan')):>9.3f}" for k in keys))
  for n in sorted({r[1] for r in rows}):
    sel = [r[2] for r in rows if r[1] == n]
    lines.append(f"{'mean':<40}{n:>7}" + "".join(f"{np.nanmean([m.get(k, np.nan) for m in sel]):>9.3f}" for k in keys))
  return "\n".join(lines)


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--wav", nargs="+", required=True, help="Audio files (globs are expanded).")
  p.add_argument("--encoder", help="Encoder safetensors (released layout).")
  p.add_argument("--decoder", help="Decoder safetensors (released layout).")
  p.add_argument("--checkpoint", help="Folder with encoder.safetensors and decoder.safetensors.")
  p.add_argument("--layers", default="12", help="Comma-separated numbers of RVQ layers to decode with.")
  p.add_argument("--chunk_seconds", type=float, default=30.0, help="Chunk longer files (bounded memory).")
  args = p.parse_args(argv)
  if args.checkpoint:
    args.encoder = os.path.join(args.checkpoint, "encoder.safetensors")
    args.decoder = os.path.join(args.checkpoint, "decoder.safetensors")
  if not (args.encoder and args.decoder):
    p.error("give --encoder and --decoder, or --checkpoint")
  try:
    codec = model_loading.load_codec(args.encoder, args.decoder)
  except model_loading.ModelFileError as e:
    raise cli_support.UserError(f"{e}; give the codec's released encoder and decoder files") from None
  layers = [min(int(n), codec.config.num_quantizers) for n in args.layers.split(",")]
  files = [f for pattern in args.wav for f in (sorted(glob.glob(pattern)) or [pattern])]
  rows, audios, recs = [], [], []
  for path in files:
    audio, rec = read_audio(path, codec.config.sample_rate), {}
    for n, m in evaluate(codec, audio, layers, args.chunk_seconds, rec).items():
      rows.append((os.path.basename(path), n, m))
    n_keep = int(CROSS_SECONDS * codec.config.sample_rate)
    audios.append(audio[:n_keep])
    recs.append({n: r[:n_keep] for n, r in rec.items()})
  add_cross_mel(rows, audios, recs, codec.config.sample_rate)
  print(format_table(rows))
  if pystoi is None or pesq_lib is None:
    print("(STOI/PESQ: pip install pystoi pesq)")
  return rows



def run_main() -> None:
  """`python -m metis_jax.codec_report`."""
  main()
