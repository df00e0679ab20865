"""Long inputs of the condition tasks (SE, TSE, VC) in overlapping windows, joined in the waveform.

The fine-tuned models saw 3-30 s clips, so minutes of noisy, mixed or source
audio are cut into windows of `window_seconds` overlapping by
`overlap_seconds`, on the 50 Hz token grid (a window starts at a multiple of
320 samples at 16 kHz). Each window is one ordinary call of the model: its own
condition (w2v-BERT over the window, or over [prompt; window] for TSE / VC,
exactly as a short input), its own tokens, its own S2A + codec rendering.

The windows' waveforms (24 kHz) are joined in the WAVEFORM domain: window k
is placed at its start time and the overlaps are crossfaded linearly (the
weights sum to one everywhere), so where neighbouring windows agree the
join is exact, and where they differ the output moves from one to the other
over the whole overlap without a step. An input that fits one window is one
call and passes through unchanged (single-pass output).
"""

import dataclasses
import math
from typing import Sequence

import numpy as np

SAMPLES_PER_TOKEN = 320   # 16 kHz samples per 50 Hz SSL frame
WINDOW_TAIL = 80          # 400-sample analysis window: W tokens need W * 320 + 80 samples


@dataclasses.dataclass(frozen=True)
class Window:
  """Samples [start, start + length) of a 16 kHz input; `start_token` = start / 320."""
  start: int
  length: int

  @property
  def start_token(self) -> int:
    return self.start // SAMPLES_PER_TOKEN


def plan(num_samples: int, window_seconds: float, overlap_seconds: float,
         token_rate: int = 50) -> list[Window]:
  """Windows covering `num_samples` 16 kHz samples.

  One window when the input fits (`window_seconds`, or <= 0 for no
  windowing); otherwise windows of W = window_seconds * 50 tokens starting
  every W - O tokens (O = overlap_seconds * 50), the last one running to the
  end (longer than the overlap).
  """
  if window_seconds <= 0:
    return [Window(0, num_samples)]
  w = int(round(window_seconds * token_rate))
  o = int(round(overlap_seconds * token_rate))
  if not 0 <= o < w:
    raise ValueError(f"the window overlap ({overlap_seconds:g} s) must be shorter than the window "
                     f"({window_seconds:g} s) and not negative")
  capacity = w * SAMPLES_PER_TOKEN + WINDOW_TAIL
  if num_samples <= capacity:
    return [Window(0, num_samples)]
  total_tokens = (num_samples - WINDOW_TAIL) // SAMPLES_PER_TOKEN
  hop = w - o
  count = max(2, math.ceil((total_tokens - o) / hop))
  out = []
  for k in range(count):
    start = k * hop * SAMPLES_PER_TOKEN
    end = num_samples if k == count - 1 else min(num_samples, start + capacity)
    out.append(Window(start, end - start))
  return out


def crossfade_join(pieces: Sequence[np.ndarray], offsets: Sequence[int]) -> np.ndarray:
  """Overlap-adds `pieces` placed at `offsets` (samples), crossfading linearly where they overlap.

  Piece k's weight ramps from 0 to 1 over its overlap with piece k - 1 and
  from 1 to 0 over its overlap with piece k + 1; the output is the
  weight-normalized sum, so one piece comes back unchanged and two equal
  signals join exactly.

  Args:
    pieces: 1-D float arrays, in time order (offsets increasing).
    offsets: start sample of each piece in the output.

  Returns:
    `[max(offset + len)]` float32.
  """
  if not pieces:
    return np.zeros((0,), np.float32)
  if len(pieces) == 1:
    return np.asarray(pieces[0], np.float32).copy()
  total = max(o + len(p) for p, o in zip(pieces, offsets))
  acc = np.zeros((total,), np.float64)
  norm = np.zeros((total,), np.float64)
  for k, (piece, off) in enumerate(zip(pieces, offsets)):
    piece = np.asarray(piece, np.float64)
    w = np.ones((len(piece),), np.float64)
    if k > 0:  # ramp up over the overlap with the previous piece
      prev_end = offsets[k - 1] + len(pieces[k - 1])
      n = int(np.clip(prev_end - off, 0, len(piece)))
      if n:
        w[:n] = np.minimum(w[:n], (np.arange(n) + 0.5) / n)
    if k + 1 < len(pieces):  # ramp down over the overlap with the next piece
      n = int(np.clip(off + len(piece) - offsets[k + 1], 0, len(piece)))
      if n:
        w[len(piece) - n:] = np.minimum(w[len(piece) - n:], (n - np.arange(n) - 0.5) / n)
    acc[off:off + len(piece)] += w * piece
    norm[off:off + len(piece)] += w
  return (acc / np.maximum(norm, 1e-12)).astype(np.float32)
