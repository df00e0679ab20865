"""Synthetic tokenized corpora: shards of random token sequences.

For tests and benchmarks of the input pipeline, where audio and a tokenizer
would only cost time. Records use the real format (`records`) and the real
writer (`shards`), so the pipeline cannot tell the difference.
"""

import os
from typing import Optional

import numpy as np

from metis_jax.data import records
from metis_jax.data import shards


def acoustic_for(tokens: np.ndarray, num_layers: int, codebook_size: int, extra_frame: bool) -> np.ndarray:
  """The synthetic acoustic tokens of an utterance: `[T (+1), Q]`, layer q = (token + 7 q) mod C.

  A function of the SSL token at the same frame, so alignment is checkable
  (and learnable); `extra_frame` appends one more frame (code C - 1 in every
  layer), as a real codec gives about one frame more than the SSL tokenizer.
  """
  codes = (tokens.astype(np.int64)[:, None] + 7 * np.arange(num_layers)[None, :]) % codebook_size
  if extra_frame:
    codes = np.concatenate([codes, np.full((1, num_layers), codebook_size - 1)])
  return codes.astype(np.int16)


def write_token_shards(output_dir: str, num_records: int, num_shards: int = 4, *, min_tokens: int = 50,
                       max_tokens: int = 500, vocab_size: int = 1024, seed: int = 0, prefix: str = "tokens",
                       id_prefix: Optional[str] = None, acoustic_layers: int = 0,
                       acoustic_codebook_size: int = 1024) -> dict[str, np.ndarray]:
  """Writes `num_records` random utterances into `num_shards` shards.

  Args:
    output_dir: created if needed.
    num_records: total records.
    num_shards: shard files (records are dealt round-robin).
    min_tokens: shortest sequence.
    max_tokens: longest sequence.
    vocab_size: token ids are in [0, vocab_size).
    seed: numpy seed.
    prefix: shard file prefix.
    id_prefix: record ids are f'{id_prefix}{i:06d}' (default: prefix + '-').
    acoustic_layers: Q > 0 also writes acoustic tokens `acoustic_for(tokens,
      Q, acoustic_codebook_size, extra_frame=i % 2 == 0)`: every other record
      has one acoustic frame more than SSL tokens.
    acoustic_codebook_size: C of the acoustic tokens.

  Returns:
    {record id: int16 tokens [T]}.
  """
  os.makedirs(output_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  id_prefix = prefix + "-" if id_prefix is None else id_prefix
  data = {}
  per_shard: list[list[bytes]] = [[] for _ in range(num_shards)]
  for i in range(num_records):
    rid = f"{id_prefix}{i:06d}"
    n = int(rng.integers(min_tokens, max_tokens + 1))
    tokens = rng.integers(0, vocab_size, size=n).astype(np.int16)
    data[rid] = tokens
    acoustic = (acoustic_for(tokens, acoustic_layers, acoustic_codebook_size, i % 2 == 0)
                if acoustic_layers else None)
    per_shard[i % num_shards].append(records.encode(rid, tokens, text=f"utterance {i}", speaker=f"spk{i % 7}",
                                                    language="en", duration=n / 50.0,
                                                    acoustic_tokens=acoustic))
  for s, recs in enumerate(per_shard):
    shards.write_shard(os.path.join(output_dir, shards.shard_name(s, num_shards, prefix)), recs)
  return data
