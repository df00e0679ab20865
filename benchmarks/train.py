r"""Throughput of the train step on the devices present, and the AOT memory of metis_base on v5p-256.

  python benchmarks/train.py                 # tiny + base, S2A tiny + full (reduced depth on CPU)
  python benchmarks/train.py --full_base     # the real 16-layer base and S2A (accelerators)
  python benchmarks/train.py --variant "b32:train.global_batch_size=32" \
      --variant "b32 xla:train.global_batch_size=32,model.attention_impl=xla"   # side by side

For each config: tokens/s, step time and MFU of the jitted train step (state
donated, synthetic batch, timed after two warm-up steps, blocking only at the
end of the timed window). Stage 1 (tiny, metis_base) and S2A (s2a_tiny,
s2a_full: one codec layer per step) go through the same engine. On a CPU the
full base (16 layers, 1024 tokens per sequence) takes minutes per step, so the
base and S2A rows keep their width, heads and vocabularies but use 2 layers
and 256-token sequences (noted in the table).
MFU on CPU uses a nominal 1 TFLOP/s peak per device (metrics.CPU_FALLBACK_FLOPS)
and is not meaningful. The last section runs
`python -m metis_jax.train_compile --config configs/metis_base.py --topology v5p-256`
when libtpu is installed.
"""

import argparse
import os
import subprocess
import sys
import time

import jax

from metis_jax import config_lib
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.models import metis
from metis_jax.training import metrics
from metis_jax.training import aot_compile as train_compile
from metis_jax.training import state as train_state
from metis_jax.training import step as train_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(name: str, overrides: list, steps: int, note: str = "") -> dict:
  """Times `steps` train steps of config `name` with `overrides` on all devices."""
  config = config_lib.load_config(name, ["train.synthetic_data=True", "mesh.fsdp=-1"] + overrides)
  mesh = mesh_lib.create_mesh(config.mesh)
  setup = train_state.make_setup(config)
  state = train_state.create_sharded_state(setup, mesh, config.seed)
  spec = input_pipeline.batch_spec(config)
  step_fn = train_step.jit_train_step(setup, config, mesh, train_state.state_shardings(setup, mesh), spec)
  batch = next(input_pipeline.make_train_iterator(config, mesh))
  start = time.perf_counter()
  for _ in range(2):  # compile + one warm step
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  step_time = (time.perf_counter() - start) / steps
  tokens = config.train.global_batch_size * config.train.seq_length
  per_token = metrics.training_flops_per_token(config.model, config.train.seq_length)
  peak = metrics.peak_flops_per_device(mesh.devices.flat[0].device_kind)
  tps = tokens / step_time
  return dict(config=name, note=note, params=metis.count_params(state.params),
              shape=f"{config.train.global_batch_size}x{config.train.seq_length}",
              layers=config.model.num_layers, dtype=config.model.dtype, step_time=step_time,
              tokens_per_second=tps, mfu=metrics.mfu(tps, per_token, mesh.devices.size, peak),
              warmup=warmup, loss=float(m["loss"]))


def aot_section() -> list[str]:
  """The train_compile report of metis_base on v5p-256 (a subprocess, run before this
  process initializes any backend: libtpu allows one user at a time)."""
  if not train_compile.libtpu_available():
    return ["  skipped: libtpu is not installed (pip install 'jax[tpu]' provides the TPU compiler; "
            "no TPU needed)"]
  out = subprocess.run([sys.executable, "-m", "metis_jax.train_compile", "--config",
                        os.path.join(REPO_ROOT, "configs", "metis_base.py"), "--topology", "v5p-256"],
                       cwd=REPO_ROOT, capture_output=True, text=True)
  lines = ["  " + line for line in out.stdout.splitlines()]
  if out.returncode:
    lines.append(out.stderr[-2000:])
  return lines


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--full_base", action="store_true", help="16-layer base at 1024 tokens")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--variant", action="append", default=[],
                      help="extra metis_base rows compared side by side: 'name:key=value,key=value' "
                           "(config overrides, e.g. 'b16 xla:train.global_batch_size=16,"
                           "model.attention_impl=xla'); repeatable")
  args = parser.parse_args()
  aot = aot_section()
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  print(f"devices: {jax.device_count()} x {device.device_kind} ({device.platform}); "
        f"peak bf16 {metrics.peak_flops_per_device(device.device_kind) / 1e12:.0f} TFLOP/s per device"
        + (" (nominal CPU figure)" if on_cpu else ""))
  rows = [bench("tiny", [], args.steps), bench("s2a_tiny", [], args.steps)]
  n = jax.device_count()
  for name in ("metis_base", "s2a_full"):
    if args.full_base or not on_cpu:
      rows.append(bench(name, [f"train.global_batch_size={8 * n}"], args.steps))
    else:
      rows.append(bench(name, ["model.num_layers=2", "train.seq_length=256",
                               f"train.global_batch_size={2 * n}", "model.dtype=float32"],
                        max(2, args.steps // 2), note="reduced: 2 of 16 layers, T=256, fp32 on CPU"))
  for spec in args.variant:
    label, _, overrides = spec.partition(":")
    try:
      rows.append(bench("metis_base", [o for o in overrides.split(",") if o], args.steps, note=label))
    except Exception as e:  # pylint: disable=broad-except
      # A variant that does not fit (out of memory) or does not compile is a result, not a crash.
      print(f"variant {label} failed: {type(e).__name__}: {str(e)[:300]}")
  header = (f"{'config':<12}{'params':>9}{'layers':>7}{'batch':>10}{'dtype':>10}{'step':>10}"
            f"{'tokens/s':>12}{'MFU':>8}  note")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:<12}{r['params'] / 1e6:>8.1f}M{r['layers']:>7}{r['shape']:>10}{r['dtype']:>10}"
          f"{r['step_time'] * 1e3:>8.1f}ms{r['tokens_per_second']:>12,.0f}{100 * r['mfu']:>7.2f}%  {r['note']}")
  print("(step time after 2 warm-up steps; compile + warm-up took "
        + ", ".join(f"{r['config']} {r['warmup']:.0f}s" for r in rows) + ")")
  print("\nAOT dry run: metis_base on v5p-256")
  print("\n".join(aot))
  return 0


if __name__ == "__main__":
  sys.exit(main())
