r"""Text -> phone ids for the phone-conditioned models (MaskGCT T2S, Metis TTS/Omni).

The released models were trained on the phones of Amphion's G2P, so this
follows it step by step (spec §9; Amphion `models/tts/maskgct/g2p`) for
English, French, German and Korean:

1. A per-language normalizer: English expands abbreviations (Mr -> mister)
   and numbers, currency, percentages, fractions, ordinals and years into
   words; French and German map CJK/typographic punctuation to , . ! ? and
   drop brackets and quotes (French also expands abbreviations); Korean drops
   Hanja and spells known upper-case English words in Hangul.
2. Cleaning as Amphion's `TextTokenizer`: CJK punctuation to ASCII, every
   character other than letters, digits, spaces and `, . ? ! ; : ' …`
   removed, spaces around punctuation removed.
3. espeak-ng through `phonemizer` (voices en-us, fr-fr, de, ko; no stress
   marks, language-switch flags removed, punctuation preserved): phones
   joined by '|', words by '|_|', each punctuation mark its own phone.
4. English only: the phone maps of the reference (t|ɹ -> tɹ, ɐ -> ɚ, ...).
   The reference appends a word separator after a final phone and then drops
   it again (`chn_eng_g2p`); the net effect, no trailing '_', is kept.
5. Phones -> ids with the model's `vocab.json` (Amphion's 363 symbols);
   symbols not in it are dropped.

Deliberate differences: numbers are spelled with spaces and no group commas
("one thousand two hundred thirty four", where inflect gives "one thousand,
two hundred thirty-four", the reference then deletes the hyphen and reads a
pause at the comma); text with Chinese characters is refused (the Chinese and
Japanese front-ends need jieba/pypinyin/an ONNX model and pyopenjtalk, which
are not ported).

The espeak-ng engine and its data come from the `espeakng-loader` wheel, so
nothing needs a system install: `setup_espeak()` points phonemizer at them.
"""

import functools
import json
import os
import re
import threading
from typing import Mapping, Sequence, Union

# Language code -> espeak-ng voice (as in Amphion's PhonemeBpeTokenizer).
LANGUAGES = {"en": "en-us", "fr": "fr-fr", "de": "de", "ko": "ko"}
# Accepted spellings of the codes above.
ALIASES = {"en-us": "en", "english": "en", "fr-fr": "fr", "french": "fr", "de-de": "de",
           "german": "de", "ko-kr": "ko", "korean": "ko"}
# Languages of the released vocabulary whose front-end is not ported.
NOT_PORTED = {"zh": "Chinese (needs jieba, pypinyin and the polyphone BERT model)",
              "ja": "Japanese (needs pyopenjtalk and pykakasi)"}
PUNCTUATION = ",.?!;:'…"
PHONE_SEP, WORD_SEP = "|", "|_|"
WORD_TOKEN = "_"


class G2PError(ValueError):
  """Text that cannot be turned into phones (the message says why)."""


def normalize_language(language: str) -> str:
  """'en', 'EN', 'en-us' -> 'en'; raises G2PError for anything else."""
  code = (language or "").strip().lower().replace("_", "-")
  code = ALIASES.get(code, code)
  if code in LANGUAGES:
    return code
  if code in NOT_PORTED:
    raise G2PError(f"language {language!r}: the {NOT_PORTED[code]} front-end is not ported; "
                   f"supported: {', '.join(sorted(LANGUAGES))}")
  raise G2PError(f"unknown language {language!r}; supported: {', '.join(sorted(LANGUAGES))}")


# ----------------------------------------------------------------------------- espeak set-up

_SETUP_LOCK = threading.Lock()
_SETUP_DONE = False


def setup_espeak() -> None:
  """Points phonemizer at the libespeak-ng and data shipped by `espeakng-loader` (idempotent)."""
  global _SETUP_DONE
  with _SETUP_LOCK:
    if _SETUP_DONE:
      return
    try:
      import espeakng_loader  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("G2P needs the espeak-ng engine: pip install espeakng-loader") from e
    try:
      from phonemizer.backend.espeak.wrapper import EspeakWrapper  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("G2P needs phonemizer: pip install 'phonemizer>=3.3' (or the g2p extra: "
                        "pip install -e '.[g2p]')") from e
    library, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    os.environ.setdefault("PHONEMIZER_ESPEAK_LIBRARY", library)
    os.environ.setdefault("ESPEAK_DATA_PATH", data)
    EspeakWrapper.set_library(library)
    if hasattr(EspeakWrapper, "set_data_path"):
      EspeakWrapper.set_data_path(data)
    _SETUP_DONE = True


@functools.lru_cache(maxsize=None)
def _backend(voice: str):
  setup_espeak()
  import logging  # pylint: disable=g-import-not-at-top
  from phonemizer.backend import EspeakBackend  # pylint: disable=g-import-not-at-top
  # Punctuation splits words, so phonemizer's word-count check warns on most lines: quiet it.
  logger = logging.getLogger("metis_jax.frontend.g2p.espeak")
  logger.setLevel(logging.ERROR)
  return EspeakBackend(voice, punctuation_marks=PUNCTUATION, preserve_punctuation=True,
                       with_stress=False, tie=False, language_switch="remove-flags",
                       words_mismatch="ignore", logger=logger)


_ESPEAK_LOCK = threading.Lock()  # libespeak-ng keeps global state.


def _phonemize(text: str, voice: str) -> str:
  from phonemizer.separator import Separator  # pylint: disable=g-import-not-at-top
  with _ESPEAK_LOCK:
    out = _backend(voice).phonemize([text], separator=Separator(word=WORD_SEP, syllable="-",
                                                                phone=PHONE_SEP),
                                    strip=True, njobs=1)
  return out[0] if out else ""


# ----------------------------------------------------------------------------- English numbers

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))
_ORDINAL_EXCEPTIONS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                       "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int, zero: str = "zero") -> str:
  """123 -> 'one hundred twenty three' (no 'and', no commas, no hyphens)."""
  if n < 0:
    return "minus " + number_to_words(-n, zero)
  if n == 0:
    return zero
  if n >= 10 ** 15:
    return " ".join(_ONES[int(d)] for d in str(n))
  words = []
  for value, name in _SCALES:
    if n >= value:
      words += [number_to_words(n // value), name]
      n %= value
  if n >= 100:
    words += [_ONES[n // 100], "hundred"]
    n %= 100
  if n >= 20:
    words.append(_TENS[n // 10])
    n %= 10
  if n or not words:
    words.append(_ONES[n])
  return " ".join(words)


def ordinal_words(n: int) -> str:
  """21 -> 'twenty first', 40 -> 'fortieth'."""
  words = number_to_words(n).split()
  last = words[-1]
  if last in _ORDINAL_EXCEPTIONS:
    last = _ORDINAL_EXCEPTIONS[last]
  elif last.endswith("y"):
    last = last[:-1] + "ieth"
  else:
    last += "th"
  return " ".join(words[:-1] + [last])


def _year_words(n: int) -> str:
  """Numbers 1001..2999 read as years (the reference's rule)."""
  if n == 2000:
    return "two thousand"
  if 2000 < n < 2010:
    return "two thousand " + number_to_words(n % 100)
  if n % 100 == 0:
    return number_to_words(n // 100) + " hundred"
  high, low = divmod(n, 100)
  return number_to_words(high) + " " + (number_to_words(low) if low >= 10 else "oh " + _ONES[low])


def _expand_dollars(m) -> str:
  parts = m.group(1).split(".")
  if len(parts) > 2:
    return " " + m.group(1) + " dollars "
  dollars = int(parts[0]) if parts[0] else 0
  cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
  unit = lambda k, one, many: one if k == 1 else many
  if dollars and cents:
    return f" {dollars} {unit(dollars, 'dollar', 'dollars')}, {cents} {unit(cents, 'cent', 'cents')} "
  if dollars:
    return f" {dollars} {unit(dollars, 'dollar', 'dollars')} "
  if cents:
    return f" {cents} {unit(cents, 'cent', 'cents')} "
  return " zero dollars "


def _expand_fraction(m) -> str:
  num, den = int(m.group(1)), int(m.group(2))
  if (num, den) == (1, 2):
    return " one half "
  if (num, den) == (1, 4):
    return " one quarter "
  if den == 2:
    return f" {number_to_words(num)} halves "
  if den == 4:
    return f" {number_to_words(num)} quarters "
  return f" {number_to_words(num)} {ordinal_words(den)} "


def _expand_number(m) -> str:
  n = int(m.group(0))
  return " " + (_year_words(n) if 1000 < n < 3000 else number_to_words(n)) + " "


_EN_ABBREVIATIONS = [(re.compile(r"\b%s\b" % a, re.IGNORECASE), b) for a, b in [
    ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
    ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"),
    ("rev", "reverend"), ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"),
    ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"),
    ("ft", "fort"), ("etc", "et cetera"), ("btw", "by the way")]]


def normalize_english(text: str) -> str:
  """Abbreviations and numbers to words (the reference's `_english_to_ipa` text step)."""
  for regex, replacement in _EN_ABBREVIATIONS:
    text = regex.sub(replacement, text)
  text = re.sub(r"([0-9][0-9,]+[0-9])", lambda m: m.group(1).replace(",", ""), text)
  text = re.sub(r"£([0-9,]*[0-9]+)", r"\1 pounds", text)
  text = re.sub(r"\$([0-9.,]*[0-9]+)", _expand_dollars, text)
  text = re.sub(r"([0-9]+)/([0-9]+)", _expand_fraction, text)
  text = re.sub(r"([0-9]+\.[0-9]+)", lambda m: m.group(1).replace(".", " point "), text)
  text = re.sub(r"([0-9.,]*[0-9]+%)", lambda m: m.group(1).replace("%", " percent "), text)
  text = re.sub(r"([0-9]+)(st|nd|rd|th)\b", lambda m: " " + ordinal_words(int(m.group(1))) + " ", text)
  text = re.sub(r"[0-9]+", _expand_number, text)
  return text


# English phone maps of the reference (applied on whole phones between separators).
_EN_PHONE_MAP = (("t|ɹ", "tɹ"), ("d|ɹ", "dɹ"), ("t|s", "ts"), ("d|z", "dz"), ("ɪ|ɹ", "ɪɹ"),
                 ("ɐ", "ɚ"), ("ᵻ", "ɪ"), ("əl", "l"), ("x", "k"), ("ɬ", "l"), ("ʔ", "t"),
                 ("n̩", "n"), ("oː|ɹ", "oːɹ"))


def english_phone_map(phones: str) -> str:
  for source, target in _EN_PHONE_MAP:
    pattern = re.compile(r"(^|[_|])" + re.escape(source) + r"([_|]|$)")
    while pattern.search(phones):
      phones = pattern.sub(lambda m, t=target: m.group(1) + t + m.group(2), phones)
  return phones


# ----------------------------------------------------------------------------- French / German / Korean

_EU_PUNCTUATION_MAP = {
    "：": ",", "；": ",", "，": ",", "。": ".", "！": "!", "？": "?", "\n": ".", "·": ",", "、": ",",
    "...": ".", "…": ".", "$": ".", "“": "", "”": "", "‘": "", "’": "", "（": "", "）": "", "(": "",
    ")": "", "《": "", "》": "", "【": "", "】": "", "[": "", "]": "", "—": "", "～": "-", "~": "-",
    "「": "", "」": "", "¿": "", "¡": ""}
_EU_PUNCTUATION_RE = re.compile("|".join(re.escape(p) for p in _EU_PUNCTUATION_MAP))

_FR_ABBREVIATIONS = [(re.compile(r"\b%s\." % re.escape(a), re.IGNORECASE), b) for a, b in [
    ("M", "monsieur"), ("Mlle", "mademoiselle"), ("Mlles", "mesdemoiselles"), ("Mme", "Madame"),
    ("Mmes", "Mesdames"), ("N.B", "nota bene"), ("p.c.q", "parce que"), ("Pr", "professeur"),
    ("qqch", "quelque chose"), ("rdv", "rendez-vous"), ("max", "maximum"), ("min", "minimum"),
    ("no", "numéro"), ("adr", "adresse"), ("dr", "docteur"), ("st", "saint"), ("co", "companie"),
    ("jr", "junior"), ("sgt", "sergent"), ("capt", "capitain"), ("col", "colonel"),
    ("av", "avenue"), ("av. J.-C", "avant Jésus-Christ"), ("apr. J.-C", "après Jésus-Christ"),
    ("art", "article"), ("boul", "boulevard"), ("c.-à-d", "c’est-à-dire"), ("etc", "et cetera"),
    ("ex", "exemple"), ("excl", "exclusivement")]] + [
        (re.compile(r"\b%s" % a), b) for a, b in [
            ("Mlle", "mademoiselle"), ("Mlles", "mesdemoiselles"), ("Mme", "Madame"),
            ("Mmes", "Mesdames")]]


def _normalize_european(text: str, french: bool) -> str:
  if french:
    for regex, replacement in _FR_ABBREVIATIONS:
      text = regex.sub(replacement, text)
  text = _EU_PUNCTUATION_RE.sub(lambda m: _EU_PUNCTUATION_MAP[m.group()], text)
  text = text.replace(";", ",").replace("-", " ").replace(":", ",")
  if french:
    text = text.replace("&", " et ")
  text = re.sub(r"[<>()\[\]\"«»]+", "", text)
  text = re.sub(r"^[,.!?]+", "", text)
  return re.sub(r"\s+", " ", text).strip()


_KO_ENGLISH = {
    "KOREA": "코리아", "IDOL": "아이돌", "IT": "아이티", "IQ": "아이큐", "UP": "업", "DOWN": "다운",
    "PC": "피씨", "CCTV": "씨씨티비", "SNS": "에스엔에스", "AI": "에이아이", "CEO": "씨이오",
    "A": "에이", "B": "비", "C": "씨", "D": "디", "E": "이", "F": "에프", "G": "지", "H": "에이치",
    "I": "아이", "J": "제이", "K": "케이", "L": "엘", "M": "엠", "N": "엔", "O": "오", "P": "피",
    "Q": "큐", "R": "알", "S": "에스", "T": "티", "U": "유", "V": "브이", "W": "더블유", "X": "엑스",
    "Y": "와이", "Z": "제트"}
_HANJA_RE = re.compile("[⺀-⺙⺛-⻳⼀-⿕々〇〡-〩〸-〺〻㐀-䶵一-鿃豈-鶴侮-頻並-龎]")


def normalize_korean(text: str) -> str:
  text = _HANJA_RE.sub("", text.strip())
  text = re.sub("([A-Za-z]+)", lambda m: _KO_ENGLISH.get(m.group(), m.group()), text)
  return text.lower()


_NORMALIZERS = {"en": normalize_english, "fr": lambda t: _normalize_european(t, True),
                "de": lambda t: _normalize_european(t, False), "ko": normalize_korean}

_CJK_PUNCTUATION = (("，", ","), ("。", "."), ("！", "!"), ("？", "?"), ("；", ";"), ("：", ":"),
                    ("、", ","), ("‘", "'"), ("’", "'"), ("⋯", "…"), ("···", "…"), ("・・・", "…"),
                    ("...", "…"))
_CHINESE_RE = re.compile("[\u4e00-\u9fa5]")


def clean_for_espeak(text: str) -> str:
  """Amphion `TextTokenizer` cleaning: ASCII punctuation, only letters/digits/spaces/`,.?!;:'…`."""
  text = text.strip()
  for a, b in _CJK_PUNCTUATION:
    text = text.replace(a, b)
  text = re.sub(r"[^\w\s_,.?!;:'…]", "", text)
  text = re.sub(r"\s*([,.?!;:'…])\s*", r"\1", text)
  return re.sub(r"\s+", " ", text)


# ----------------------------------------------------------------------------- vocabulary and G2P


def load_vocab(path: str) -> dict[str, int]:
  """Reads a phone vocabulary: `{"vocab": {symbol: id}}` (Amphion's file) or a flat mapping."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path}: phone vocabulary not found") from e
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the phone vocabulary ({e})") from e
  vocab = data.get("vocab", data) if isinstance(data, dict) else None
  if not isinstance(vocab, dict) or not vocab or not all(isinstance(v, int) for v in vocab.values()):
    raise ValueError(f"{path}: expected {{\"vocab\": {{phone: id}}}} with integer ids")
  return dict(vocab)


class G2P:
  """Text -> phones -> ids with a fixed vocabulary.

  Example:
    g2p = G2P("vocab.json")
    ids = g2p("Hello world.", "en")           # list[int]
    phones = g2p.phones("Bonjour.", "fr")     # ['b', 'ɔ̃', 'ʒ', 'u', 'ʁ', '.']
  """

  def __init__(self, vocab: Union[str, Mapping[str, int]]):
    self.vocab = load_vocab(vocab) if isinstance(vocab, str) else dict(vocab)

  def phonemize(self, text: str, language: str) -> str:
    """The '|'-joined phone string (words joined by '|_|'), before the vocabulary."""
    code = normalize_language(language)
    if text is None or not text.strip():
      raise G2PError("empty text")
    if _CHINESE_RE.search(text):
      raise G2PError(f"text with Chinese characters ({text[:30]!r}...): the Chinese front-end is "
                     "not ported")
    cleaned = clean_for_espeak(_NORMALIZERS[code](text))
    if not re.search(r"\w", cleaned):
      raise G2PError(f"no pronounceable characters in {text!r}")
    phones = _phonemize(cleaned, LANGUAGES[code])
    phones = re.sub(r"([,.?!;:'…])", r"|\1|", phones)
    phones = re.sub(r"\|+", "|", phones).strip("|")
    if code == "en":
      phones = english_phone_map(phones)
      phones = re.sub(r"(\|_)+$", "", phones)
    return phones

  def phones(self, text: str, language: str) -> list[str]:
    """Phone symbols in the vocabulary (unknown symbols dropped)."""
    return [p for p in self.phonemize(text, language).split(PHONE_SEP) if p in self.vocab]

  def __call__(self, text: str, language: str) -> list[int]:
    """Phone ids; raises G2PError if the text yields none."""
    ids = [self.vocab[p] for p in self.phones(text, language)]
    if not ids:
      raise G2PError(f"no phones in the vocabulary for {text!r} ({language})")
    return ids

  def batch(self, texts: Sequence[str], language: str) -> list[list[int]]:
    return [self(t, language) for t in texts]
