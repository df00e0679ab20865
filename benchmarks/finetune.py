r"""Fine-tuning cost at metis_base: `lora+adapter` (SE) against `full`, from abstract inputs.

  python benchmarks/finetune.py                       # B 2 x T 256, cpu-8 memory
  python benchmarks/finetune.py --batch 1 --length 256 --memory_batch 8

Rows (nothing of base size is allocated: parameters come from `jax.eval_shape`):
  trainable params     `trainable.group_counts` of the configs/metis_se.py model
  optimizer state      bytes of the AdamW state of the trainable tree (`jax.eval_shape`)
  forward / backward   FLOPs of one batch from `compiled.cost_analysis()` on one CPU device:
                       the loss of `finetune_objective` (forward) and its `value_and_grad` in
                       the trainable tree (argnums 0); backward = grad - forward. XLA counts a
                       scanned layer once, so both are compiled unrolled at 1 and 2 layers and
                       extrapolated linearly to 16 (exact for identical layers). Condition
                       features come precomputed in the batch (the frozen w2v-BERT encoder,
                       the same forward for both, is left out).
  per-chip memory      the jitted fine-tune step (state donated, frozen base as an argument)
                       compiled for cpu-8 (fsdp 8) at `--memory_batch` x T, as train_compile
                       does for pre-training; the stage-1 pre-training step of the same model
                       alongside. v5p-8 needs libtpu (`--topology v5p-8`).
  step time            with `--step_time`: the real jitted fine-tune step on the first local
                       device, random weights, `--step_batch` x T, both modes interleaved
                       (`--step_repeats` rounds, median); `--step_layers` < 16 keeps the full
                       fine-tune's state (weights, grads, AdamW: ~16 B per parameter) in RAM;
                       `--only_step_time` prints this row alone.
"""

import argparse
import os
import sys

if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from metis_jax import config_lib  # pylint: disable=wrong-import-position
from metis_jax.models import metis  # pylint: disable=wrong-import-position
from metis_jax.parallel import mesh as mesh_lib  # pylint: disable=wrong-import-position
from metis_jax.training import aot_compile  # pylint: disable=wrong-import-position
from metis_jax.training import finetune_objective as fto  # pylint: disable=wrong-import-position
from metis_jax.training import metrics as metrics_lib  # pylint: disable=wrong-import-position
from metis_jax.training import trainable as trainable_lib  # pylint: disable=wrong-import-position

MODES = ("lora+adapter", "full")


def make_config(mode: str, *overrides: str):
  """configs/metis_se.py trained as `mode`; `full` without LoRA (as the released full fine-tunes)."""
  extra = ["model.lora_rank=0", "model.lora_dropout=0.0"] if mode == "full" else []
  return config_lib.load_config("configs/metis_se.py", [f"finetune.trainable={mode}", "finetune.base=/nonexistent",
                                                       *extra, *overrides])


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def loss_program(setup, config, batch_size: int, length: int, grad: bool):
  """(trainable, frozen, batch) -> loss [and grads in the trainable tree], jitted for one device."""
  spec = fto.batch_spec(config, features_in_batch=True, batch=batch_size, length=length)

  def loss(trainable, frozen, batch):
    mask, seq_valid, _ = fto.sample_finetune_mask(jax.random.key(0), batch["valid"], batch["prompt_lengths"],
                                                  setup.masking, setup.prompt_drop_prob)
    features = fto.condition_features(setup, None, batch)
    params = fto.graft(trainable, frozen)
    _, logits = setup.model.apply({"params": params}, batch["tokens"], mask.is_masked, seq_valid, mask.t,
                                  features=features)
    ce, _, count = fto.masking.masked_cross_entropy(logits, batch["tokens"], mask.is_masked & seq_valid)
    return ce * count

  fn = jax.value_and_grad(loss) if grad else loss
  shapes = fto.param_shapes(setup)
  mask = fto.trainable_mask(setup)
  return jax.jit(fn).lower(fto.select(shapes, mask, True), fto.select(shapes, mask, False), spec).compile()


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def layer_flops(mode: str, batch_size: int, length: int, layers: int) -> dict:
  """Forward and grad FLOPs at `layers` unrolled layers, extrapolated linearly from 1 and 2."""
  out = {}
  for grad in (False, True):
    f = []
    for n in (1, 2):
      config = make_config(mode, f"model.num_layers={n}", "model.scan_layers=False", "model.remat_policy=none")
      f.append(flops(loss_program(fto.make_setup(config, with_encoder=False), config, batch_size, length, grad)))
    out["grad" if grad else "forward"] = f[0] + (layers - 1) * (f[1] - f[0])
  out["backward"] = out["grad"] - out["forward"]
  return out


def step_memory(mode: str, devices, batch_size: int, length: int) -> dict:
  config = make_config(mode, f"train.global_batch_size={batch_size}", f"train.seq_length={length}")
  setup = fto.make_setup(config, with_encoder=False)
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  spec = fto.batch_spec(config, features_in_batch=True)
  step = fto.jit_finetune_step(setup, config, mesh, spec)
  compiled = step.lower(fto.abstract_state(setup, mesh), spec, fto.abstract_frozen(setup, mesh), None).compile()
  return metrics_lib.memory_summary(compiled)


def pretrain_memory(devices, batch_size: int, length: int) -> dict:
  config = config_lib.load_config("configs/metis_base.py", [f"train.global_batch_size={batch_size}",
                                                            f"train.seq_length={length}"])
  compiled = aot_compile.compile_train_step(config, devices)[0]
  return metrics_lib.memory_summary(compiled)


def random_batch(spec: dict, vocab: int, rng: np.random.Generator) -> dict:
  """Host arrays for a fine-tune batch spec: full rows, prompts of a quarter, random features."""
  out = {}
  for k, s in spec.items():
    if k == "tokens":
      out[k] = rng.integers(0, vocab, s.shape, dtype=np.int32)
    elif k in ("valid", "phone_valid"):
      out[k] = np.ones(s.shape, bool)
    elif k == "prompt_lengths":
      out[k] = np.full(s.shape, spec["tokens"].shape[1] // 4, np.int32)
    elif k.endswith("lengths"):
      out[k] = np.full(s.shape, spec["tokens"].shape[1], np.int32)
    elif np.issubdtype(s.dtype, np.floating):
      out[k] = rng.standard_normal(s.shape).astype(s.dtype)
    else:
      out[k] = np.zeros(s.shape, s.dtype)
  return out


def step_times(batch_size: int, length: int, layers: int, repeats: int) -> dict:
  """Median seconds of the jitted fine-tune step per mode, modes interleaved round by round."""
  import time  # pylint: disable=import-outside-toplevel
  devices = jax.devices()[:1]
  runs = {}
  for mode in MODES:
    config = make_config(mode, f"train.global_batch_size={batch_size}", f"train.seq_length={length}",
                         f"model.num_layers={layers}", "train.warmup_steps=1")
    setup = fto.make_setup(config, with_encoder=False)
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    spec = fto.batch_spec(config, features_in_batch=True)
    step = fto.jit_finetune_step(setup, config, mesh, spec)
    full = jax.jit(lambda: metis.init_params(setup.model, jax.random.key(1)))()
    frozen = fto.select(full, fto.trainable_mask(setup), False)
    state = jax.jit(fto.init_fn(setup, 0), out_shardings=fto.state_shardings(setup, mesh))()
    batch = random_batch(spec, int(config.model.vocab_size), np.random.default_rng(0))
    runs[mode] = {"step": step, "state": state, "frozen": frozen, "batch": batch, "times": []}
  for r in range(repeats + 1):
    for mode, run in runs.items():
      t0 = time.perf_counter()
      run["state"], metrics = run["step"](run["state"], run["batch"], run["frozen"], None)
      jax.block_until_ready(metrics)
      if r:  # round 0 compiles
        run["times"].append(time.perf_counter() - t0)
  return {mode: float(np.median(run["times"])) for mode, run in runs.items()}


def gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--memory_batch", type=int, default=8)
  ap.add_argument("--topology", default="cpu-8")
  ap.add_argument("--skip_memory", action="store_true")
  ap.add_argument("--step_time", action="store_true", help="also time the real step on this device")
  ap.add_argument("--step_batch", type=int, default=1)
  ap.add_argument("--step_layers", type=int, default=16)
  ap.add_argument("--step_repeats", type=int, default=3)
  ap.add_argument("--only_step_time", action="store_true", help="print the step-time row alone")
  args = ap.parse_args(argv)
  if args.only_step_time:
    args.step_time = True
  rows = {}
  for mode in ([] if args.only_step_time else MODES):
    config = make_config(mode)
    setup = fto.make_setup(config, with_encoder=False)
    state = jax.eval_shape(fto.init_fn(setup, 0))
    counts = trainable_lib.group_counts(fto.param_shapes(setup), fto.trainable_mask(setup))
    rows[mode] = {"trainable": sum(counts.values()), "groups": counts, "opt_bytes": nbytes(state.opt_state),
                  "state_bytes": nbytes(state.params) + nbytes(state.opt_state)}
    rows[mode].update(layer_flops(mode, args.batch, args.length, int(config.model.num_layers)))
    print(f"{mode}: {rows[mode]}", file=sys.stderr, flush=True)
  memory = {}
  target = aot_compile.parse_topology(args.topology)
  if not args.skip_memory and not args.only_step_time:
    if target.platform != "cpu" and not aot_compile.libtpu_available():
      print(f"{args.topology}: libtpu is not installed; per-chip memory for TPU skipped", flush=True)
    else:
      devices = aot_compile.target_devices(target)
      for mode in MODES:
        memory[mode] = step_memory(mode, devices, args.memory_batch, args.length)
      memory["pre-training (stage 1)"] = pretrain_memory(devices, args.memory_batch, args.length)
  if not args.only_step_time:
    lo, full = rows["lora+adapter"], rows["full"]
    print(f"\nmetis_base fine-tuning (configs/metis_se.py), loss FLOPs at B {args.batch} x T {args.length}")
    print(f"{'':28} {'lora+adapter':>16} {'full':>16} {'ratio':>8}")
    table = [("trainable parameters", lo["trainable"] / 1e6, full["trainable"] / 1e6, "{:.1f}M"),
             ("optimizer state", lo["opt_bytes"] / 2 ** 20, full["opt_bytes"] / 2 ** 20, "{:.1f} MiB"),
             ("forward FLOPs", lo["forward"] / 1e9, full["forward"] / 1e9, "{:.1f} G"),
             ("backward FLOPs", lo["backward"] / 1e9, full["backward"] / 1e9, "{:.1f} G")]
    for name, a, b, fmt in table:
      print(f"{name:28} {fmt.format(a):>16} {fmt.format(b):>16} {a / b:8.3f}")
  if args.step_time:
    times = step_times(args.step_batch, args.length, args.step_layers, args.step_repeats)
    print(f"step time on {jax.devices()[0].platform} (B {args.step_batch} x T {args.length}, "
          f"{args.step_layers} layers, median of {args.step_repeats}): "
          f"lora+adapter {times['lora+adapter']:.2f} s, full {times['full']:.2f} s, "
          f"ratio {times['lora+adapter'] / times['full']:.3f}")
  for name, m in memory.items():
    print(f"{args.topology} per-chip memory, {name} (B {args.memory_batch} x T {args.length}): "
          f"total {gib(m['total'])} (arguments {gib(m['argument'])}, temporaries {gib(m['temp'])})")


if __name__ == "__main__":
  main()
