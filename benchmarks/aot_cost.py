r"""Accelerator-free cost estimate: compiled FLOPs and bytes against the analytical minimum.

  python benchmarks/aot_cost.py                         # metis_base train + decode, cpu column
  python benchmarks/aot_cost.py --train_shapes 8x1024 --decode_batches 1,8 --phones 100
  python benchmarks/aot_cost.py --topology v5p-8        # adds a TPU column (needs libtpu)

Every program is lowered and compiled ahead of time from abstract inputs
(`jax.ShapeDtypeStruct`; parameters from `jax.eval_shape`, nothing of base
size is allocated) and `compiled.cost_analysis()` gives its FLOPs and bytes
accessed. Programs:

  train B x T       the trainer's step (`training.aot_compile.compile_train_step`:
                    loss, gradients, clipping, AdamW) of `--config` on one device,
                    synthetic-data batch spec, remat `--remat` (default 'none':
                    the target excludes rematerialization). The metis_base_v5p256
                    per-chip shape (512 / 128 chips = 4 x 1024) is one of the
                    default shapes.
  decode step       one MaskGIT step of `MetisDecoder` (10 s target = 500 tokens,
                    3 s prompt = 150 tokens, `--phones` phones, CFG 2.5), batch b.
  decode 25 steps   the whole decode (the jitted `lax.scan` over 25 steps).

XLA's cost analysis counts a loop body once, whatever its trip count, so the
programs are compiled with their loops unrolled (`scan_layers=False`, and
`lax.scan` forced to `unroll=True` while lowering) at 1 and 2 layers (and 1
and 2 decode steps) and extrapolated linearly to the real depth and step
count: cost(L, S) = a + S (b + L c) is exact for a stack of identical layers.
(Unrolling lets XLA merge identical step-invariant work across unrolled steps,
so a decode figure is a lower bound for the scanned program.)

Analytical minimum (H hidden, M = mlp_ratio H, V vocabulary, L layers):

  matmul weights per token  N = L (4 H^2 + 3 H M)    (q, k, v, o; SwiGLU gate, up, down)
  forward FLOPs of n tokens attending over n keys (one sequence):
        F(n) = 2 N n + 4 L H n^2                      (QK^T and AV: 2 n^2 H each)
  per-row condition work    2 (2 L + 1) H^2 + 4 H M   (adaptive-norm gains, time MLP)
  phone prefix              4 H M per phone           (phone MLP)

  train:  model FLOPs = 3 B [F(T) + per-row + 2 H V s T]  (forward + backward = 3 x
          forward; remat excluded; the head runs only on scored positions, the fraction
          s = E[max(gamma(t), min_mask_ratio)] x (1 - (1 - p_drop) E[prompt]/T) of the
          config's masking rules). `--head_all` counts the head on every position.
          minimum bytes = P (4 + 4 + 4 + 4 + 24) + 5 L B T H a
          (fp32 weights read in the forward and in the backward, gradients written and
          read once, params / Adam mu / nu read and written once; each layer's
          activations: forward reads its input and writes its output, backward reads the
          saved input and the output gradient and writes the input gradient; a = bytes
          per activation in the compute dtype; logits never stored).
  decode step (prompt p, target T, phones f, batch b, CFG):
          model FLOPs = b [F(f + p + T) + 4 H M f + F(T) + 2 H V T + 2 per-row]
          (the conditional pass over [phones | prompt | target], the unconditional pass
          over the target alone, as the original; the head once on the guided target).
          minimum bytes = P w + L a H b (2 (f + p + T) + 2 T) + 4 b T V
          (every weight read once per step (w = bytes per stored parameter), each layer's
          input read and output written once per token of both passes, the float32
          target logits written once).
  decode S steps = S x decode step.

The TPU column compiles the same programs for `--topology` (default v5p-8, 4 chips)
through `training.aot_compile`'s topology machinery, replicated on one chip's shape:
it needs libtpu (`pip install 'jax[tpu]'`, no TPU needed) and is skipped with the
reason otherwise.
"""

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from metis_jax import config_lib
from metis_jax.inference import decoding
from metis_jax.models import masking
from metis_jax.models import metis
from metis_jax.training import aot_compile

TOKENS_PER_SECOND = 50


@contextlib.contextmanager
def unrolled_scans():
  """While active, every `jax.lax.scan` traced is fully unrolled (for exact cost counts)."""
  original = jax.lax.scan

  def scan(*args, **kwargs):
    kwargs["unroll"] = True
    return original(*args, **kwargs)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def cost_of(lower: Callable[[], object]) -> dict:
  """FLOPs and bytes accessed of the compiled program `lower()` returns (a Lowered)."""
  with unrolled_scans():
    lowered = lower()
  compiled = lowered.compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def extrapolate(c11: dict, c21: dict, c12: dict | None, layers: int, steps: int) -> dict:
  """cost(L, S) = a + S (b + L c) from cost(1, 1), cost(2, 1) and cost(1, 2).

  Without `c12` (no step loop) S is 1 and cost(L) = c11 + (L - 1) (c21 - c11).
  """
  out = {}
  for key in ("flops", "bytes"):
    c = c21[key] - c11[key]
    if c12 is None:
      out[key] = c11[key] + (layers - 1) * c
      continue
    b = c12[key] - c11[key] - c
    a = c11[key] - b - c
    out[key] = a + steps * (b + layers * c)
  return out


# ----------------------------------------------------------------------------- model formulas


@dataclasses.dataclass(frozen=True)
class Dims:
  hidden: int
  mlp: int
  layers: int
  vocab: int
  act_bytes: int      # compute dtype
  param_bytes: int    # stored parameter dtype
  params: int         # all parameters

  @classmethod
  def from_config(cls, config, params: int) -> "Dims":
    m = config.model
    return cls(m.hidden_size, m.mlp_ratio * m.hidden_size, m.num_layers, m.vocab_size,
               jnp.dtype(m.dtype).itemsize, jnp.dtype(m.param_dtype).itemsize, params)

  @property
  def layer_matmul_params(self) -> int:
    return self.layers * (4 * self.hidden ** 2 + 3 * self.hidden * self.mlp)

  def forward(self, n: int) -> float:
    """F(n): one sequence of n tokens attending over its n keys."""
    return 2.0 * self.layer_matmul_params * n + 4.0 * self.layers * self.hidden * n * n

  @property
  def per_row(self) -> float:
    return 2.0 * (2 * self.layers + 1) * self.hidden ** 2 + 4.0 * self.hidden * self.mlp


def scored_fraction(config) -> float:
  """Expected fraction of a row's positions the training loss scores (masked, past the prompt)."""
  c = config.masking
  t = (np.arange(100_000) + 0.5) / 100_000
  ratio = float(np.maximum(masking.mask_ratio(t, c.schedule), c.min_mask_ratio).mean())
  length = config.train.seq_length
  low = min(length // c.prompt_min_divisor, c.prompt_min_tokens)
  high = max(int(length * c.prompt_max_fraction), low + 1)
  prompt = (1 - c.prompt_drop_prob) * (low + high - 1) / 2
  return ratio * (1 - prompt / length)


def train_minimum(d: Dims, batch: int, length: int, head_fraction: float) -> tuple[float, float]:
  flops = 3.0 * batch * (d.forward(length) + d.per_row + 2.0 * d.hidden * d.vocab * head_fraction * length)
  bytes_ = d.params * 40.0 + 5.0 * d.layers * batch * length * d.hidden * d.act_bytes
  return flops, bytes_


def decode_step_minimum(d: Dims, batch: int, phones: int, prompt: int, target: int,
                        cfg: bool) -> tuple[float, float]:
  cond = phones + prompt + target
  flops = d.forward(cond) + 4.0 * d.hidden * d.mlp * phones + d.per_row
  tokens = 2 * cond
  if cfg:
    flops += d.forward(target) + d.per_row
    tokens += 2 * target
  flops = batch * (flops + 2.0 * d.hidden * d.vocab * target)
  bytes_ = (d.params * d.param_bytes + d.layers * d.act_bytes * d.hidden * batch * tokens
            + 4.0 * batch * target * d.vocab)
  return flops, bytes_


# ----------------------------------------------------------------------------- programs


def base_config(name: str, overrides: list[str]):
  return config_lib.load_config(name, overrides)


def train_cost(config_name: str, batch: int, length: int, remat: str, devices: list) -> dict:
  """Extrapolated cost of the train step at the config's depth."""
  costs = []
  for layers in (1, 2):
    config = base_config(config_name, [
        "train.synthetic_data=True", "mesh.fsdp=-1", "mesh.dcn_data=1", "mesh.data=1",
        f"train.global_batch_size={batch}", f"train.seq_length={length}",
        f"model.num_layers={layers}", "model.scan_layers=False", f"model.remat_policy={remat}",
        "train.grad_accum_steps=1"])

    def lower(config=config):
      from metis_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
      from metis_jax.training import input_pipeline, state as train_state, step as step_lib  # pylint: disable=import-outside-toplevel
      mesh = mesh_lib.create_mesh(config.mesh, devices)
      setup = train_state.make_setup(config)
      state = train_state.abstract_state(setup, mesh)
      spec = input_pipeline.batch_spec(config)
      step = step_lib.jit_train_step(setup, config, mesh, train_state.state_shardings(setup, mesh), spec)
      return step.lower(state, spec)

    costs.append(cost_of(lower))
  layers = base_config(config_name, []).model.num_layers
  return extrapolate(costs[0], costs[1], None, layers, 1)


def decode_cost(config_name: str, batch: int, phones: int, prompt: int, target: int,
                cfg: float, device, total_steps: int) -> tuple[dict, dict]:
  """(per-step, whole-decode) extrapolated cost at the config's depth and `total_steps`."""
  full = base_config(config_name, [f"model.use_phone_cond={phones > 0}"])
  costs = {}
  for layers, steps in ((1, 1), (2, 1), (1, 2)):
    config = base_config(config_name, [f"model.num_layers={layers}", "model.scan_layers=False",
                                       f"model.use_phone_cond={phones > 0}"])
    model = metis.MetisModel(metis.MetisConfig.from_config(config.model))
    params = jax.eval_shape(lambda r, model=model: metis.init_params(model, r), jax.random.key(0))
    options = decoding.DecodeOptions.from_config(config.decode)
    options = dataclasses.replace(options, steps=steps, cfg=cfg)
    decoder = decoding.MetisDecoder(model, options)
    placed = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
    on_device = lambda tree: jax.tree.map(lambda x: spec(x.shape, x.dtype), tree)
    args = (on_device(params), on_device(jax.eval_shape(lambda: jax.random.key(2))),
            spec((batch, prompt), jnp.int32), spec((batch,), jnp.int32), spec((batch,), jnp.int32))
    kwargs = dict(target_len=target, phones=None, phone_lengths=None, prompt_features=None,
                  target_features=None)
    if phones:
      kwargs.update(phones=spec((batch, phones), jnp.int32), phone_lengths=spec((batch,), jnp.int32))
    costs[(layers, steps)] = cost_of(
        lambda decoder=decoder, args=args, kwargs=kwargs: decoder._jitted.lower(*args, **kwargs))
  layers = full.model.num_layers
  step = extrapolate(costs[(1, 1)], costs[(2, 1)], costs[(1, 2)], layers, 2)
  one = extrapolate(costs[(1, 1)], costs[(2, 1)], costs[(1, 2)], layers, 1)
  per_step = {k: step[k] - one[k] for k in step}
  whole = extrapolate(costs[(1, 1)], costs[(2, 1)], costs[(1, 2)], layers, total_steps)
  return per_step, whole


# ----------------------------------------------------------------------------- driver


def tpu_devices(topology: str) -> tuple[list | None, str]:
  """(devices of `topology`, '') or (None, why the column is skipped)."""
  if not aot_compile.libtpu_available():
    return None, ("libtpu is not installed (pip install 'jax[tpu]' provides the TPU compiler; "
                  "no TPU needed)")
  try:
    target = aot_compile.parse_topology(topology)
    return aot_compile.target_devices(target), ""
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {str(e)[:200]}"


def parse_shape(text: str) -> tuple[int, int]:
  b, t = text.lower().split("x")
  return int(b), int(t)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="metis_base")
  parser.add_argument("--train_shapes", default="8x1024,4x1024",
                      help="B x T of the train step; 4x1024 is metis_base_v5p256 per chip")
  parser.add_argument("--remat", default="none", help="model.remat_policy of the train step")
  parser.add_argument("--head_all", action="store_true",
                      help="model FLOPs count the head on every position, not only scored ones")
  parser.add_argument("--decode_batches", default="1,8")
  parser.add_argument("--prompt_seconds", type=float, default=3.0)
  parser.add_argument("--target_seconds", type=float, default=10.0)
  parser.add_argument("--phones", type=int, default=100,
                      help="phone prefix length of the decode (0: a model without phones)")
  parser.add_argument("--cfg", type=float, default=2.5)
  parser.add_argument("--steps", type=int, default=25, help="decoding steps of the whole decode")
  parser.add_argument("--topology", default="v5p-8", help="TPU topology of the second column")
  parser.add_argument("--skip_train", action="store_true")
  parser.add_argument("--skip_decode", action="store_true")
  args = parser.parse_args()

  columns = {"cpu": [jax.devices("cpu")[0]]}
  tpu, why = tpu_devices(args.topology)
  if tpu is not None:
    columns[args.topology] = tpu[:1]
  full = base_config(args.config, [])
  prompt = int(args.prompt_seconds * TOKENS_PER_SECOND)
  target = int(args.target_seconds * TOKENS_PER_SECOND)

  rows = []  # (label, minimum flops, minimum bytes, {column: cost})
  if not args.skip_train:
    params = metis.count_params(jax.eval_shape(
        lambda r: metis.init_params(metis.MetisModel(metis.MetisConfig.from_config(full.model)), r),
        jax.random.key(0)))
    dims = Dims.from_config(full, params)
    fraction = 1.0 if args.head_all else scored_fraction(full)
    for shape in args.train_shapes.split(","):
      batch, length = parse_shape(shape)
      flops, bytes_ = train_minimum(dims, batch, length, fraction)
      costs = {}
      for name, devices in columns.items():
        start = time.perf_counter()
        costs[name] = train_cost(args.config, batch, length, args.remat, devices)
        print(f"  compiled train {shape} for {name} in {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
      rows.append((f"train {batch}x{length} remat={args.remat}", flops, bytes_, costs))
  if not args.skip_decode:
    with_phones = base_config(args.config, [f"model.use_phone_cond={args.phones > 0}"])
    params = metis.count_params(jax.eval_shape(
        lambda r: metis.init_params(metis.MetisModel(metis.MetisConfig.from_config(with_phones.model)), r),
        jax.random.key(0)))
    dims = Dims.from_config(with_phones, params)
    for batch in (int(b) for b in args.decode_batches.split(",")):
      flops, bytes_ = decode_step_minimum(dims, batch, args.phones, prompt, target, args.cfg != 0)
      step_costs, whole_costs = {}, {}
      for name, devices in columns.items():
        start = time.perf_counter()
        step_costs[name], whole_costs[name] = decode_cost(
            args.config, batch, args.phones, prompt, target, args.cfg, devices[0], args.steps)
        print(f"  compiled decode b={batch} for {name} in {time.perf_counter() - start:.0f}s",
              file=sys.stderr, flush=True)
      label = f"decode b={batch} {args.target_seconds:g}s+{args.prompt_seconds:g}s p{args.phones}"
      rows.append((label + " step", flops, bytes_, step_costs))
      rows.append((label + f" {args.steps} steps", args.steps * flops, args.steps * bytes_,
                   whole_costs))

  print(f"{args.config}: {full.model.num_layers} layers, H {full.model.hidden_size}, "
        f"V {full.model.vocab_size}, compute {full.model.dtype}, params {full.model.param_dtype}; "
        f"CFG {args.cfg:g}")
  names = list(columns)
  header = f"{'program':<40}{'model GFLOP':>13}{'min GB':>9}"
  for name in names:
    header += f"{name + ' FLOPs/model':>22}{name + ' bytes/min':>20}"
  print(header)
  print("-" * len(header))
  for label, flops, bytes_, costs in rows:
    line = f"{label:<40}{flops / 1e9:>13.1f}{bytes_ / 1e9:>9.2f}"
    for name in names:
      c = costs[name]
      line += f"{c['flops'] / flops:>22.3f}{c['bytes'] / bytes_:>20.2f}"
    print(line)
  if tpu is None:
    print(f"({args.topology} column skipped: {why})")
  print("(program figures: compiled.cost_analysis(), loops unrolled at 1-2 layers/steps and "
        "extrapolated; see the module docstring for the minimum formulas)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
