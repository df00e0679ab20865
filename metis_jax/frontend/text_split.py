"""Splitting long text into chunks the model can say in one go.

The released models were trained on 3-30 s clips and garble long targets
(Amphion issues #290, #357), so long text is generated chunk by chunk. Text is
cut at sentence ends (. ! ? … and their CJK forms), not after common
abbreviations ("Mr.", "e.g.") or single initials ("J."); sentences are then
packed greedily into chunks whose cost (e.g. estimated tokens) stays within a
budget. A sentence over the budget is cut at clause punctuation (, ; : —),
and a clause still over it at word boundaries. No text is lost or reordered:
joining the chunks with spaces gives the input back up to whitespace.
"""

import re
from typing import Callable, Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|(?<=[。！？])")
_CLAUSE_END = re.compile(r"(?<=[,;:，；：—])\s+")
# Words whose trailing period does not end a sentence (lower case, without the period).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no fig vol mt capt col gen lt sgt rev hon "
    "approx dept est inc ltd co corp av ave blvd m mme mlle nr bzw ca z.b usw".split())


def _ends_with_abbreviation(piece: str) -> bool:
  words = piece.rstrip().split()
  if not words:
    return False
  last = words[-1].rstrip(".").strip("\"'(“‘").lower()
  if last in ABBREVIATIONS:
    return True
  return len(last) == 1 and last.isalpha() and words[-1].endswith(".")  # an initial: "J."


def split_sentences(text: str) -> list[str]:
  """Sentences of `text` (stripped, non-empty), punctuation kept."""
  text = re.sub(r"\s+", " ", text or "").strip()
  if not text:
    return []
  pieces, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    piece = text[start:m.end()]
    if piece.strip() and not _ends_with_abbreviation(piece):
      pieces.append(piece.strip())
      start = m.end()
  if text[start:].strip():
    pieces.append(text[start:].strip())
  return pieces


def _split_over_budget(sentence: str, cost: Callable[[str], float], budget: float) -> list[str]:
  """Cuts one sentence at clauses, then words, into pieces within the budget."""
  if cost(sentence) <= budget:
    return [sentence]
  parts = [p for p in _CLAUSE_END.split(sentence) if p.strip()]
  if len(parts) == 1:
    parts = sentence.split()
    if len(parts) == 1:
      return [sentence]  # one word: nothing to cut
  return _pack(parts, cost, budget)


def _pack(pieces: Sequence[str], cost: Callable[[str], float], budget: float) -> list[str]:
  chunks, current = [], ""
  for piece in pieces:
    candidate = f"{current} {piece}" if current else piece
    if current and cost(candidate) > budget:
      chunks.append(current)
      current = piece
    else:
      current = candidate
  if current:
    chunks.append(current)
  out = []
  for chunk in chunks:
    out += _split_over_budget(chunk, cost, budget) if cost(chunk) > budget else [chunk]
  return out


def split_text(text: str, cost: Callable[[str], float], budget: float) -> list[str]:
  """Chunks of whole sentences whose `cost` is at most `budget` where possible.

  Args:
    text: the text to say.
    cost: estimated cost of a piece of text (e.g. its tokens of speech).
    budget: the most cost per chunk (a single word over it is kept whole).

  Returns:
    Non-empty chunks in order; one chunk if the whole text fits.
  """
  if budget <= 0:
    raise ValueError(f"chunk budget must be positive, got {budget}")
  sentences = split_sentences(text)
  if not sentences:
    return []
  if cost(" ".join(sentences)) <= budget:
    return [" ".join(sentences)]
  return _pack(sentences, cost, budget)
