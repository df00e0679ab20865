"""Synthetic noise and room responses for the SE task, so everything runs offline.

Run:
  python -m metis_jax.data.make_demo_noise --output /tmp/demo_noise [--corpus /tmp/metis_demo_corpus]

Writes `noise/` (white, pink, brown noise; 50 and 60 Hz hum; with --corpus,
babble made of demo utterances) and `rir/` (exponential decays, rt60
0.2-0.8 s) as 16 kHz wav files: pass `OUTPUT/noise` and `OUTPUT/rir` as the
SE task's noise and room-response folders. See `noise.make_demo_noise`.
"""

import argparse
from typing import Optional, Sequence

from metis_jax.data import noise


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", required=True, help="folder to write noise/ and rir/ to")
  parser.add_argument("--corpus", default="", help="demo corpus folder to make babble from (optional)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seconds", type=float, default=8.0, help="length of each noise clip")
  args = parser.parse_args(argv)
  out = noise.make_demo_noise(args.output, args.corpus, args.seed, args.seconds)
  print(f"demo noise: {len(out['noise'])} noise clips and {len(out['rir'])} room responses in {args.output}")


if __name__ == "__main__":
  main()
