r"""Throughput of the SSL front-end: audio hours tokenized per device-hour.

  python benchmarks/tokenization.py                          # batch 16 x 10 s (the target setting)
  python benchmarks/tokenization.py --batch=2 --seconds=5    # small enough for a CPU
  python benchmarks/tokenization.py --dtype=bfloat16         # accelerators

Chains, each timed separately (one jitted function per row, random weights
at the released sizes, speed does not depend on their values):
  fbank                 SeamlessM4T filterbank (JAX, float32)
  + w2v-BERT[:17]       conformer blocks 1..17 (1024 wide) + stats normalization
  + semantic codec      `SemanticCodec.quantize` (VocosBackbone 12 layers + VQ 8192),
                        when metis_jax/semantic_codec.py is present
For each: compile time (separate), the best of `--repeats` timed runs, and
audio hours per device-hour = batch * seconds / time (= 1 / real-time factor).
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.frontend import fbank, ssl_features
from metis_jax.models import w2v_bert

try:
  from metis_jax.models import semantic_codec
except ImportError:  # built by another part of the project
  semantic_codec = None

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 16, "Clips per batch.")
flags.DEFINE_float("seconds", 10.0, "Clip length in seconds (16 kHz).")
flags.DEFINE_string("dtype", "", "Compute dtype of the encoder and codec (default: float32 on CPU, "
                    "bfloat16 elsewhere).")
flags.DEFINE_integer("output_layer", 17, "Conformer blocks computed.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions (the best is reported).")
flags.DEFINE_bool("codec", True, "Include the semantic codec's quantize if available.")


def _time(fn, args, repeats):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return compile_s, best


def main(argv):
  del argv
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  dtype = FLAGS.dtype or ("float32" if on_cpu else "bfloat16")
  samples = int(FLAGS.seconds * fbank.SAMPLE_RATE)
  batch = FLAGS.batch
  rng = np.random.default_rng(0)
  waves = jnp.asarray(0.1 * rng.standard_normal((batch, samples)), jnp.float32)
  lengths = jnp.full((batch,), samples, jnp.int32)
  tokens = int(fbank.num_tokens(samples))

  cfg = w2v_bert.W2VBertConfig(output_layer=FLAGS.output_layer, dtype=dtype)
  params = w2v_bert.init_params(cfg, jax.random.key(0))
  mean, var = jnp.zeros((cfg.hidden_size,)), jnp.ones((cfg.hidden_size,))

  chains = [("fbank", lambda w, n: fbank.extract(w, n).features, (waves, lengths))]
  encode = lambda p, w, n: ssl_features.features(cfg, p, mean, var, w, n)[0]
  chains.append((f"+ w2v-BERT[:{cfg.output_layer}]", encode, (params, waves, lengths)))
  if FLAGS.codec and semantic_codec is not None and hasattr(semantic_codec.SemanticCodec, "quantize"):
    codec = semantic_codec.SemanticCodec(semantic_codec.SemanticCodecConfig(dtype=dtype))
    codec_params = semantic_codec.init_params(codec, jax.random.key(1))

    def tokenize(p, cp, w, n):
      feats, feat_lengths = ssl_features.features(cfg, p, mean, var, w, n)
      valid = jnp.arange(feats.shape[1])[None, :] < feat_lengths[:, None]
      codes, _ = codec.apply({"params": cp}, feats, valid, method=semantic_codec.SemanticCodec.quantize)
      return codes

    chains.append(("+ semantic codec", tokenize, (params, codec_params, waves, lengths)))

  print(f"device: {device.device_kind} ({device.platform}) x {jax.device_count()}; batch {batch} x "
        f"{FLAGS.seconds:g} s ({tokens} tokens each); dtype {dtype}; random weights, released sizes")
  header = f"{'chain':<22}{'compile s':>11}{'batch s':>10}{'tokens/s':>11}{'audio h / device h':>20}"
  print(header)
  print("-" * len(header))
  audio_s = batch * FLAGS.seconds
  for name, fn, args in chains:
    compile_s, run_s = _time(fn, args, FLAGS.repeats)
    print(f"{name:<22}{compile_s:>11.1f}{run_s:>10.3f}{batch * tokens / run_s:>11.0f}{audio_s / run_s:>20.1f}")


if __name__ == "__main__":
  app.run(main)
