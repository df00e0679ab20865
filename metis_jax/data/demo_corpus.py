"""A small, real-speech demo corpus made locally with the espeak-ng engine.

Run:
  python -m metis_jax.data.demo_corpus --output /tmp/metis_demo_corpus

Writes `LANG/SPEAKER/LANG_SPEAKER_NNN.wav` (16-bit mono, 22.05 kHz, espeak's
native rate) with `.txt` (the transcript) and `.json` ({speaker, language,
text}) beside each: the 'dir' layout that `readers` ingests. By default 4
languages x 3 voices x 8 sentences, about 5 minutes of speech in a few seconds
of compute. The engine is libespeak-ng from the `espeakng-loader` wheel,
driven through ctypes; nothing is downloaded.

Determinism: the same call writes the same bytes on every run. libespeak-ng
keeps synthesis state in process globals (waveform phase, echo buffer, noise
generator) that carry from one utterance to the next and survive
re-initialization, so `generate` synthesizes in a fresh Python process
(`isolated=True`), in a fixed order, seeding espeak's noise generator per
utterance. Floating-point parts of the engine may still differ across CPU
architectures or `espeakng-loader` versions: `engine_version()` names it,
and the demo's fingerprints (`metis_jax.data.demo`) tell such corpora apart.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import zlib
from typing import Optional, Sequence

import numpy as np
import soundfile

# Known transcripts per language (the espeak voice name is the key's value).
SENTENCES = {
    "en": ("en-us", [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Please call Stella and ask her to bring these things with her from the store.",
        "A rainbow is a division of white light into many beautiful colors.",
        "She sells sea shells by the sea shore every summer morning.",
        "The old lighthouse keeper watched the ships sail past in the evening fog.",
        "We will meet at the library at half past nine tomorrow.",
        "Bright sunshine warmed the garden after a week of heavy rain.",
        "Reading books before bedtime helps many children fall asleep.",
    ]),
    "de": ("de", [
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Morgen früh fahren wir mit dem Zug nach Berlin.",
        "Im Garten blühen im Frühling viele bunte Blumen.",
        "Die Kinder spielen nach der Schule gern im Park.",
        "Am Abend lesen wir zusammen ein spannendes Buch.",
        "Das Wetter ist heute kalt, aber die Sonne scheint.",
        "Mein Bruder kocht jeden Sonntag eine leckere Suppe.",
        "Wir treffen uns um neun Uhr vor dem Bahnhof.",
    ]),
    "fr": ("fr", [
        "Le renard brun rapide saute par-dessus le chien paresseux.",
        "Demain matin, nous prendrons le train pour Paris.",
        "Au printemps, le jardin est plein de fleurs colorées.",
        "Les enfants aiment jouer dans le parc après l'école.",
        "Le soir, nous lisons ensemble un livre passionnant.",
        "Il fait froid aujourd'hui, mais le soleil brille.",
        "Mon frère prépare une bonne soupe chaque dimanche.",
        "Nous nous retrouvons à neuf heures devant la gare.",
    ]),
    "es": ("es", [
        "El rápido zorro marrón salta sobre el perro perezoso.",
        "Mañana por la mañana tomaremos el tren a Madrid.",
        "En primavera el jardín está lleno de flores de colores.",
        "A los niños les gusta jugar en el parque después de clase.",
        "Por la noche leemos juntos un libro muy interesante.",
        "Hoy hace frío, pero el sol brilla en el cielo.",
        "Mi hermano prepara una sopa deliciosa cada domingo.",
        "Nos vemos a las nueve delante de la estación.",
    ]),
}
# Voices: (espeak variant, words per minute, pitch 0-100).
SPEAKERS = (("m1", 165, 45), ("f3", 175, 65), ("m3", 150, 35), ("f1", 185, 70))

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
  """A process-wide handle on libespeak-ng (the library keeps global state)."""
  _instance: Optional["Espeak"] = None
  _lock = threading.Lock()

  def __init__(self):
    try:
      import espeakng_loader  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("the demo corpus needs the espeak-ng engine: pip install espeakng-loader") from e
    self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
    self.lib.espeak_Initialize.restype = ctypes.c_int
    self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                  espeakng_loader.get_data_path().encode(), 0)
    if self.sample_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
    self._chunks: list[np.ndarray] = []
    self._callback = _CALLBACK(self._on_audio)  # Keep a reference: C holds the pointer.
    self.lib.espeak_SetSynthCallback(self._callback)

  @classmethod
  def get(cls) -> "Espeak":
    with cls._lock:
      if cls._instance is None:
        cls._instance = Espeak()
      return cls._instance

  def _on_audio(self, wav, num_samples, events):
    del events
    if num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0

  def synthesize(self, text: str, voice: str, rate: int = 170, pitch: int = 50) -> np.ndarray:
    """Speech for `text` as int16 [samples] at `self.sample_rate`."""
    with self._lock:
      if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice!r}")
      self.lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
      self.lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
      # Noise (breath, frication) from espeak's own generator: seeded per utterance.
      if hasattr(self.lib, "espeak_ng_SetRandSeed"):
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(zlib.crc32(f"{voice}|{rate}|{pitch}|{text}".encode())))
      self._chunks = []
      data = text.encode("utf-8")
      err = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
      self.lib.espeak_Synchronize()
      if err != 0:
        raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
      return np.concatenate(self._chunks) if self._chunks else np.zeros((0,), np.int16)


def engine_version() -> str:
  """The espeak-ng build the corpus comes from (`espeakng-loader`'s version)."""
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return "espeakng-loader " + metadata.version("espeakng-loader")
  except Exception:  # pylint: disable=broad-except
    return "espeakng-loader unknown"


def generate(output_dir: str, languages: Sequence[str] = ("en", "de", "fr", "es"), speakers_per_language: int = 3,
             sentences_per_speaker: int = 8, isolated: bool = True) -> dict:
  """Writes the demo corpus; returns {'files': n, 'seconds': s, 'sample_rate': r}.

  Args:
    output_dir: where to write (created).
    languages: keys of SENTENCES.
    speakers_per_language: voices per language (at most len(SPEAKERS)).
    sentences_per_speaker: sentences each voice reads (at most 8).
    isolated: synthesize in a fresh process, so the bytes do not depend on
      what this process synthesized before (module docstring).
  """
  if isolated:
    return _generate_in_subprocess(output_dir, languages, speakers_per_language, sentences_per_speaker)
  engine = Espeak.get()
  files, samples = 0, 0
  for lang in languages:
    if lang not in SENTENCES:
      raise ValueError(f"demo corpus has no language {lang!r}; choose from {sorted(SENTENCES)}")
    voice, sentences = SENTENCES[lang]
    for variant, rate, pitch in SPEAKERS[:speakers_per_language]:
      speaker = f"{lang}_{variant}"
      folder = os.path.join(output_dir, lang, speaker)
      os.makedirs(folder, exist_ok=True)
      for i, text in enumerate(sentences[:sentences_per_speaker]):
        wav = engine.synthesize(text, f"{voice}+{variant}", rate, pitch)
        stem = os.path.join(folder, f"{speaker}_{i:03d}")
        soundfile.write(stem + ".wav", wav, engine.sample_rate, subtype="PCM_16")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
          f.write(text + "\n")
        with open(stem + ".json", "w", encoding="utf-8") as f:
          json.dump({"speaker": speaker, "language": lang, "text": text}, f, ensure_ascii=False)
        files += 1
        samples += len(wav)
  return {"files": files, "seconds": samples / engine.sample_rate, "sample_rate": engine.sample_rate}


def _generate_in_subprocess(output_dir: str, languages: Sequence[str], speakers: int, sentences: int) -> dict:
  for lang in languages:  # the same error as in-process, before starting anything
    if lang not in SENTENCES:
      raise ValueError(f"demo corpus has no language {lang!r}; choose from {sorted(SENTENCES)}")
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
  cmd = [sys.executable, "-m", "metis_jax.data.demo_corpus", "--output", output_dir, "--languages",
         ",".join(languages), "--speakers", str(speakers), "--sentences", str(sentences), "--json"]
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"synthesizing the demo corpus into {output_dir} failed:\n{done.stderr.strip()}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", required=True, help="folder to write the corpus to")
  parser.add_argument("--languages", default="en,de,fr,es", help="comma-separated, from " + ",".join(SENTENCES))
  parser.add_argument("--speakers", type=int, default=3, help="voices per language (<= 4)")
  parser.add_argument("--sentences", type=int, default=8, help="sentences per voice (<= 8)")
  parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
  args = parser.parse_args(argv)
  info = generate(args.output, args.languages.split(","), args.speakers, args.sentences, isolated=False)
  if args.json:
    print(json.dumps(info))
    return
  print(f"demo corpus: {info['files']} utterances, {info['seconds'] / 60:.1f} min at "
        f"{info['sample_rate']} Hz in {args.output}")


if __name__ == "__main__":
  from metis_jax import cli_support  # pylint: disable=g-import-not-at-top
  cli_support.run(main)
