r"""S2A speed: acoustic tokens for 10 s of speech, and the whole SSL-tokens-to-waveform path.

  python benchmarks/s2a.py                       # real sizes, batch 1 and 8
  python benchmarks/s2a.py --batches=1 --max_steps=1   # on a slow CPU

Real sizes with random weights (speed does not depend on their values): the
1-layer and the full S2A model (1024 wide, 16 layers, 16 heads, 8192 SSL
codes), steps [40] for layer 0 and [16, 1 x 10] for layers 1..11, CFG 2.5,
a 3 s prompt; the codec decoder (Vocos, 30 blocks) renders the target.
`--max_steps` caps each layer's steps on a CPU (rows marked '*', scaled:
every step of a layer costs the same forward pass).
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp

from metis_jax.models import acoustic_codec, s2a
from metis_jax import config_base
from metis_jax.inference import generation, s2a_decoding

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_float("target_seconds", 10.0, "Seconds of speech to generate.")
flags.DEFINE_float("prompt_seconds", 3.0, "Prompt seconds.")
flags.DEFINE_integer("max_steps", 0, "If > 0, cap every layer's steps (CPU) and scale the time.")
flags.DEFINE_integer("num_layers", 16, "Transformer blocks (reduce for a quick look).")
flags.DEFINE_string("dtype", "", "Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")

FRAMES_PER_SECOND = 50
FULL_STEPS = (40, 16) + (1,) * 10


def _stage(num_quantizers, first, steps, dtype, seed):
  cfg = config_base.model_config()
  cfg.kind, cfg.vocab_size, cfg.cond_vocab_size = "s2a", 1024, 8192
  cfg.hidden_size, cfg.num_heads, cfg.num_layers = 1024, 16, FLAGS.num_layers
  cfg.num_quantizers, cfg.predicts_first_layer, cfg.dtype = num_quantizers, first, dtype
  model = s2a.S2AModel(s2a.S2AConfig.from_config(cfg))
  params = jax.jit(lambda r: s2a.init_params(model, r))(jax.random.key(seed))
  options = s2a_decoding.S2ADecodeOptions(steps=steps, cfg=2.5 if not first else 0.0)
  return generation.S2AStage(model, params, options)


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def main(argv):
  del argv
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  dtype = FLAGS.dtype or ("float32" if on_cpu else "bfloat16")
  cap = FLAGS.max_steps if FLAGS.max_steps > 0 else None
  capped = lambda steps: tuple(min(s, cap) if cap else s for s in steps)
  first = _stage(1, True, capped((40,)), dtype, 0)
  full = _stage(12, False, capped(FULL_STEPS), dtype, 1)
  scale_first = 40 / capped((40,))[0]
  full_work = sum(FULL_STEPS[1:]) / sum(capped(FULL_STEPS)[1:])
  codec_cfg = acoustic_codec.AcousticCodecConfig(dtype=dtype)
  codec = acoustic_codec.AcousticCodecInference(
      codec_cfg, acoustic_codec.init_params(acoustic_codec.AcousticCodec(codec_cfg), jax.random.key(2)))
  renderer = generation.SpeechRenderer(full, codec, first_layer=first)
  p, t = int(FLAGS.prompt_seconds * FRAMES_PER_SECOND), int(FLAGS.target_seconds * FRAMES_PER_SECOND)
  print(f"device: {device.device_kind} ({device.platform}); {FLAGS.num_layers} blocks, {dtype}; "
        f"prompt {FLAGS.prompt_seconds:g} s, target {FLAGS.target_seconds:g} s; steps [40] + [16, 1 x 10], CFG 2.5")
  header = f"{'batch':>6}{'layer 0 s':>11}{'layers 1-11 s':>15}{'codec s':>9}{'total s':>9}{'RTF':>8}"
  print(header)
  print("-" * len(header))
  for batch in (int(b) for b in FLAGS.batches):
    key = jax.random.key(batch)
    sem_p = jax.random.randint(key, (batch, p), 0, 8192)
    ac_p = jax.random.randint(key, (batch, p, 12), 0, 1024)
    sem_t = jax.random.randint(key, (batch, t), 0, 8192)
    lp, lt = jnp.full((batch,), p), jnp.full((batch,), t)
    dec1, dec12 = renderer._first_decoder, renderer._full_decoder
    run_first = lambda: dec1(first.params, key, sem_p, ac_p, lp, sem_t, lt)
    layer0, _ = _timed(run_first)  # compile + run
    _, t_first = _timed(run_first)
    given = layer0[..., :1]
    run_full = lambda: dec12(full.params, key, sem_p, ac_p, lp, sem_t, lt, given=given)
    codes, _ = _timed(run_full)
    _, t_full = _timed(run_full)
    run_codec = lambda: codec.decode(codes, lt)
    _timed(run_codec)
    _, t_codec = _timed(run_codec)
    t_first, t_full = t_first * scale_first, t_full * full_work
    total = t_first + t_full + t_codec
    mark = " *" if cap else ""
    print(f"{batch:>6}{t_first:>11.2f}{t_full:>15.2f}{t_codec:>9.2f}{total:>9.2f}"
          f"{total / (batch * FLAGS.target_seconds):>8.3f}{mark}", flush=True)
  if cap:
    print(f"* layer steps capped at {cap} and times scaled to the full schedule "
          "(the single-step layers 2..11 are measured as they are).")


if __name__ == "__main__":
  app.run(main)
