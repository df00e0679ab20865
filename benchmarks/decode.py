r"""Decoding speed of the stage-1 model: 5 s and 10 s targets after a 3 s prompt.

  python benchmarks/decode.py                      # tiny and base, batch 1 and 8
  python benchmarks/decode.py --configs=tiny --batches=1,8,32

Prints one table row per (config, target, batch): compile time (separate),
decode time, generated tokens/s and real-time factor (decode time / seconds of
speech generated; below 1 is faster than real time). Steps, CFG and the rest
follow the reference TTS defaults (25 steps, CFG 2.5). Parameters are random
(speed does not depend on their values). On a slow device, `--max_steps`
caps the steps actually run for large configs; such rows are marked and
scaled to the full step count (every step costs the same forward pass).
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp

from metis_jax import config_lib
from metis_jax.inference import decoding
from metis_jax.models import metis

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["tiny", "metis_base"], "Config files (names in configs/).")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("target_seconds", ["5", "10"], "Target durations in seconds (50 tokens/s).")
flags.DEFINE_float("prompt_seconds", 3.0, "Prompt duration in seconds.")
flags.DEFINE_integer("steps", 25, "Decoding steps.")
flags.DEFINE_float("cfg", 2.5, "Classifier-free guidance scale.")
flags.DEFINE_integer("max_steps", 0, "If > 0 and the device is a CPU, run at most this many "
                     "steps for configs wider than 512 and scale the time (marked '*').")
flags.DEFINE_string("dtype", "", "Override the compute dtype (default: float32 on CPU, else the config's).")
flags.DEFINE_integer("repeats", 2, "Timed repetitions (the best is reported).")

TOKENS_PER_SECOND = 50


def bench_one(name, batch, target_s):
  config = config_lib.load_config(name)
  on_cpu = jax.devices()[0].platform == "cpu"
  config.model.dtype = FLAGS.dtype or ("float32" if on_cpu else config.model.dtype)
  model = metis.MetisModel(metis.MetisConfig.from_config(config.model))
  params = jax.jit(lambda r: metis.init_params(model, r))(jax.random.key(0))
  steps = FLAGS.steps
  if on_cpu and FLAGS.max_steps and config.model.hidden_size > 512:
    steps = min(steps, FLAGS.max_steps)
  options = decoding.DecodeOptions.from_config(config.decode)
  options = decoding.DecodeOptions(**{**options.__dict__, "steps": steps, "cfg": FLAGS.cfg})
  decoder = decoding.MetisDecoder(model, options)
  prompt_len = int(FLAGS.prompt_seconds * TOKENS_PER_SECOND)
  target_len = int(target_s * TOKENS_PER_SECOND)
  prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.model.vocab_size)
  args = (params, jax.random.key(2), prompt, jnp.full((batch,), prompt_len),
          jnp.full((batch,), target_len))
  start = time.perf_counter()
  decoder._jitted.lower(*args, target_len=target_len, phones=None, phone_lengths=None,
                        prompt_features=None, target_features=None).compile()
  compile_s = time.perf_counter() - start
  decoder(*args, target_len=target_len).block_until_ready()  # warm the call path
  best = float("inf")
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    decoder(*args, target_len=target_len).block_until_ready()
    best = min(best, time.perf_counter() - start)
  scaled = best * FLAGS.steps / steps
  generated_s = batch * target_s
  return dict(config=name, batch=batch, target=f"{target_s:g} s", steps=steps,
              compile_s=compile_s, decode_s=scaled, tokens_per_s=batch * target_len / scaled,
              rtf=scaled / generated_s, scaled=steps != FLAGS.steps)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}) x {jax.device_count()}; "
        f"prompt {FLAGS.prompt_seconds:g} s, {FLAGS.steps} steps, CFG {FLAGS.cfg:g}")
  header = f"{'config':<12}{'target':>8}{'batch':>7}{'compile s':>11}{'decode s':>10}{'tokens/s':>11}{'RTF':>9}"
  print(header)
  print("-" * len(header))
  for name in FLAGS.configs:
    for target_s in (float(s) for s in FLAGS.target_seconds):
      for batch in (int(b) for b in FLAGS.batches):
        r = bench_one(name, batch, target_s)
        mark = f" *{r['steps']}" if r["scaled"] else ""
        print(f"{r['config']:<12}{r['target']:>8}{r['batch']:>7}{r['compile_s']:>11.2f}"
              f"{r['decode_s']:>10.3f}{r['tokens_per_s']:>11.1f}{r['rtf']:>9.4f}{mark}", flush=True)
  if FLAGS.max_steps:
    print(f"* measured with the given number of steps and scaled to {FLAGS.steps} steps.")


if __name__ == "__main__":
  app.run(main)
