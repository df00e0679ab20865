r"""Speed of the codecs at the released sizes (random weights): real-time factors.

  python benchmarks/codec.py                                  # batch 1 (10 s) and 16 (2 s)
  python benchmarks/codec.py --seconds=10 --batches=1,16 --batch_seconds=10,10

One row per (codec, operation, batch): compile time (separate), the best of
`--repeats` timed runs, and the real-time factor RTF = time / seconds of audio
processed (batch x clip length); below 1 is faster than real time.

  acoustic encode   24 kHz waveform -> 12 x 50 Hz codes (encoder + RVQ)
  acoustic decode   codes -> waveform (vq2emb + Vocos + iSTFT)
  semantic quantize w2v-BERT features (50 Hz) -> tokens (encoder + VQ)
  semantic decode   quantized embeddings -> features

Speed does not depend on the weights' values, so they are random (numpy
normal draws in the real shapes; compiling the real initializer is slow).
`--dtype bfloat16` runs the matmuls/convolutions in bfloat16 (GPU/TPU).
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from metis_jax.models import acoustic_codec as ac
from metis_jax.models import semantic_codec as sc

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
flags.DEFINE_list("batch_seconds", ["10", "2"], "Clip seconds per batch size (same order as --batches).")
flags.DEFINE_list("parts", ["acoustic", "semantic"], "Which codecs.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions (the best is reported).")

FRAME_RATE = 50


def random_params(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray((0.02 * rng.standard_normal(x.shape)).astype(np.float32)), abstract)


def timed(fn, *args):
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm
  best = float("inf")
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return compile_s, best


def bench_acoustic(batch, seconds):
  cfg = ac.AcousticCodecConfig(dtype=FLAGS.dtype)
  model = ac.AcousticCodec(cfg)
  params = random_params(ac.abstract_params(model))
  n = int(seconds * cfg.sample_rate) // cfg.hop_size * cfg.hop_size
  wav = jax.random.normal(jax.random.key(0), (batch, n)) * 0.1
  encode = jax.jit(lambda p, w: model.apply({"params": p}, w, method=ac.AcousticCodec.encode))
  decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=ac.AcousticCodec.decode))
  codes = jax.random.randint(jax.random.key(1), (batch, n // cfg.hop_size, cfg.num_quantizers), 0,
                             cfg.codebook_size)
  yield "acoustic encode", timed(encode, params, wav)
  yield "acoustic decode", timed(decode, params, codes)


def bench_semantic(batch, seconds):
  cfg = sc.SemanticCodecConfig(dtype=FLAGS.dtype)
  model = sc.SemanticCodec(cfg)
  params = random_params(sc.abstract_params(model))
  frames = int(seconds * FRAME_RATE)
  feat = jax.random.normal(jax.random.key(0), (batch, frames, cfg.hidden_size))
  quantize = jax.jit(lambda p, x: model.apply({"params": p}, x, method=sc.SemanticCodec.quantize))
  decode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=sc.SemanticCodec.decode))
  yield "semantic quantize", timed(quantize, params, feat)
  yield "semantic decode", timed(decode, params, feat)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}) x {jax.device_count()}; dtype {FLAGS.dtype}; "
        "random weights at the released sizes")
  header = f"{'operation':<19}{'batch':>6}{'clip s':>8}{'compile s':>11}{'run s':>9}{'RTF':>9}{'x realtime':>12}"
  print(header)
  print("-" * len(header))
  benches = {"acoustic": bench_acoustic, "semantic": bench_semantic}
  for part in FLAGS.parts:
    for batch, seconds in zip((int(b) for b in FLAGS.batches), (float(s) for s in FLAGS.batch_seconds)):
      for name, (compile_s, run_s) in benches[part](batch, seconds):
        rtf = run_s / (batch * seconds)
        print(f"{name:<19}{batch:>6}{seconds:>8g}{compile_s:>11.2f}{run_s:>9.3f}{rtf:>9.4f}{1 / rtf:>12.1f}",
              flush=True)


if __name__ == "__main__":
  app.run(main)
