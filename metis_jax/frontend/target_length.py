"""How many 50 Hz tokens to generate: the released duration rules (spec §9).

The paper's flow-matching duration predictor is not released; both
references instead scale the prompt's speaking rate to the target:

  'phone_rate' (MaskGCT): floor(prompt_seconds * n_target_phones / n_prompt_phones * 50)
  'byte_rate'  (Metis):   prompt_tokens * utf8_bytes(text) // utf8_bytes(prompt_text)

and both take explicit seconds as seconds x 50. The default here is
'phone_rate': phones measure what is said (digits, abbreviations and
spelling conventions do not inflate it the way bytes do, and a CJK character
is not three times an ASCII letter), and it follows the prompt's actual
duration. 'byte_rate' reproduces Metis and needs no G2P.
"""

import math
from typing import Sequence

TOKENS_PER_SECOND = 50
RULES = ("phone_rate", "byte_rate")


def seconds_to_tokens(seconds: float) -> int:
  """Explicit duration: round(seconds x 50) (the references truncate; rounding keeps 0.1 s exact)."""
  if not seconds > 0:
    raise ValueError(f"target duration must be positive, got {seconds}")
  return max(1, int(round(seconds * TOKENS_PER_SECOND)))


def phone_rate_tokens(prompt_seconds: float, n_prompt_phones: int, n_target_phones: int) -> int:
  """MaskGCT: the prompt's seconds per phone times the target's phones, in tokens."""
  if n_prompt_phones <= 0:
    raise ValueError("the prompt text has no phones: cannot estimate the speaking rate")
  return max(1, math.floor(prompt_seconds * n_target_phones / n_prompt_phones * TOKENS_PER_SECOND))


def byte_rate_tokens(prompt_tokens: int, text: str, prompt_text: str) -> int:
  """Metis: the prompt's tokens per UTF-8 byte of its text times the target's bytes."""
  prompt_bytes = len(prompt_text.encode("utf-8"))
  if prompt_bytes == 0:
    raise ValueError("empty prompt text: cannot estimate the speaking rate")
  return max(1, prompt_tokens * len(text.encode("utf-8")) // prompt_bytes)


def split_tokens(total: int, weights: Sequence[float]) -> list[int]:
  """Splits `total` tokens over chunks in proportion to `weights` (largest remainder).

  The parts sum to `total` exactly and each is at least 1 (when total >= len).
  """
  n = len(weights)
  if n == 0:
    return []
  if total < n:
    raise ValueError(f"{total} tokens cannot be split over {n} chunks")
  w = [max(float(x), 0.0) for x in weights]
  s = sum(w) or float(n)
  w = w if sum(w) else [1.0] * n
  spare = total - n  # each chunk gets 1, the rest in proportion
  exact = [spare * x / s for x in w]
  parts = [1 + math.floor(e) for e in exact]
  order = sorted(range(n), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
  for i in order[:total - sum(parts)]:
    parts[i] += 1
  return parts
