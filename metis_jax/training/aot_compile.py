r"""Ahead-of-time dry run: compile the real train step for a target topology on this host.

  python -m metis_jax.train_compile --config configs/metis_base_v5p256.py --topology v5p-256
  python -m metis_jax.train_compile --config configs/tiny.py --topology cpu-8
  python -m metis_jax.train_compile --config configs/s2a_full.py --topology v5p-128

Stage-1 ('metis'), S2A ('s2a') and fine-tune ('metis_finetune') configs compile: the
step is the trainer's. Every batch shape the run can have is compiled (each length bucket of
`config.data`: `input_pipeline.configured_batch_specs`; `--largest_bucket_only` for just
train.seq_length), each bucket's per-device memory is listed, and the largest decides.
A fine-tune's frozen base and encoder are abstract: no weights are read.

TPU topologies (`v4-N`, `v5p-N`, `v5e-N`, `v6e-N`, N = TensorCores as in
Cloud TPU names; `--num_slices` for multi-slice) come from
`jax.experimental.topologies` and need libtpu installed
(`pip install "jax[tpu]"`); no TPU is needed. `cpu-N` compiles against N
fake CPU devices. Prints the per-device memory of the compiled step
(arguments, outputs, temporaries) and exits non-zero if its largest bucket does
not fit in the device's HBM, so an out-of-memory shows up before chips are booked.
"""

import re
import sys

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from metis_jax import cli_support
from metis_jax.models import metis
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import compile_ahead
from metis_jax.training import input_pipeline
from metis_jax.training import metrics as metrics_lib
from metis_jax.training import state as train_state
from metis_jax.training import step as train_step_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuKind:
  """How one TPU generation is named and laid out."""
  prefix: str            # name in jax topologies ("v5" for v5p)
  cores_per_chip: int    # N in "v5p-N" counts TensorCores
  dims: int              # torus dimensions
  chip_config: str       # "megacore": one JAX device per chip
  hbm_bytes: int         # per JAX device


TPU_KINDS = {
    "v4": TpuKind("v4", 2, 3, "megacore", 32 * GiB),
    "v5p": TpuKind("v5", 2, 3, "megacore", 95 * GiB),
    "v5e": TpuKind("v5e", 1, 2, "default", 16 * GiB),
    "v6e": TpuKind("v6e", 1, 2, "default", 32 * GiB),
}
# Slice shapes by chip count (the standard Cloud TPU slices).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}
# What a CPU "device" may hold in the cpu-N dry run (arbitrary; override with --hbm_gib).
CPU_DEVICE_BYTES = 16 * GiB


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed `--topology`."""
  name: str
  platform: str                         # "tpu" or "cpu"
  num_devices: int
  hbm_bytes: int
  topology_name: str = ""               # e.g. "v5:4x4x8"
  chip_config: str = ""
  wrap: tuple = ()
  chips_per_host_bounds: tuple = ()


def parse_topology(name: str) -> Target:
  """'v5p-256' / 'v5e-16' / 'v6e-256' / 'v4-8' / 'cpu-8' -> Target."""
  match = re.fullmatch(r"(v4|v5p|v5e|v6e|cpu)-(\d+)", name)
  if not match:
    raise ValueError(f"unknown topology {name!r}; use v4-N, v5p-N, v5e-N, v6e-N or cpu-N")
  kind, n = match.group(1), int(match.group(2))
  if kind == "cpu":
    return Target(name, "cpu", n, CPU_DEVICE_BYTES)
  spec = TPU_KINDS[kind]
  if n % spec.cores_per_chip:
    raise ValueError(f"{name}: {kind} counts {spec.cores_per_chip} cores per chip; N must be a multiple")
  chips = n // spec.cores_per_chip
  shapes = SHAPES_3D if spec.dims == 3 else SHAPES_2D
  if chips not in shapes:
    raise ValueError(f"{name}: no standard {kind} slice with {chips} chips; known: "
                     f"{[c * spec.cores_per_chip for c in sorted(shapes)]}")
  shape = shapes[chips]
  if spec.dims == 3:
    wrap = (chips >= 64,) * 3   # full cubes (4x4x4 and up) are tori
    bounds = (2, 2, 1)
  else:
    wrap = (shape[0] == 16, shape[1] == 16, False)  # only full 16x16 pods wrap
    bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
  return Target(name, "tpu", chips, spec.hbm_bytes,
                topology_name=f"{spec.prefix}:{'x'.join(map(str, shape))}",
                chip_config=spec.chip_config, wrap=wrap, chips_per_host_bounds=bounds)


def libtpu_available() -> bool:
  """Whether the TPU compiler (the libtpu package) is installed (not imported here)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("libtpu") is not None


def target_devices(target: Target, num_slices: int = 1) -> list:
  """The (possibly abstract) devices to compile for."""
  if target.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < target.num_devices * num_slices:
      raise RuntimeError(
          f"{target.name} needs {target.num_devices * num_slices} CPU devices but JAX has "
          f"{len(devices)}: run as `python -m metis_jax.train_compile` (which sets "
          "XLA_FLAGS=--xla_force_host_platform_device_count) or set it before importing jax")
    return devices[:target.num_devices * num_slices]
  if not libtpu_available():
    raise RuntimeError(f"compiling for {target.name} needs libtpu: pip install 'jax[tpu]' "
                       "(no TPU needed; it only provides the compiler)")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=target.topology_name, chip_config_name=target.chip_config,
      chips_per_host_bounds=target.chips_per_host_bounds, num_slices=num_slices, wrap=target.wrap)
  return list(topo.devices)


@dataclasses.dataclass
class CompileReport:
  """What the dry run compiled and whether it fits.

  Attributes:
    target, mesh: the topology and the mesh, in words.
    num_params: parameters of the model (all of them, frozen ones of a fine-tune too).
    buckets: every batch shape compiled, with its per-device memory (`compile_ahead.BucketCompile`).
    hbm_bytes: per-device memory available.
    flops_per_step: model FLOPs per step per device at the largest length.
    seconds: wall time of the compiles.
  """
  target: str
  mesh: str
  num_params: int
  buckets: list
  hbm_bytes: int
  flops_per_step: Optional[float]
  seconds: float = 0.0

  @property
  def largest(self) -> compile_ahead.BucketCompile:
    """The bucket needing the most per-device memory."""
    return compile_ahead.largest_bucket(self.buckets)

  @property
  def memory(self) -> dict:
    """Per-device memory of the largest bucket's step."""
    return self.largest.memory

  @property
  def fits(self) -> bool:
    return self.memory.get("total", 0) <= self.hbm_bytes

  def lines(self) -> list[str]:
    m = self.memory
    out = [f"target {self.target}: mesh {self.mesh}, {self.num_params / 1e6:.1f}M parameters",
           f"compiled {len(self.buckets)} batch shape(s) in {self.seconds:.1f} s; per-device memory of each:"]
    for b in self.buckets:
      out.append(f"  {b.shape:<15} {metrics_lib.format_bytes(b.memory.get('total', 0)):>12}")
    out.append(f"per-device memory of the train step at the largest, {self.largest.shape}:")
    for key in ("argument", "output", "alias", "temp", "generated_code", "total"):
      out.append(f"  {key:<15} {metrics_lib.format_bytes(m.get(key, 0)):>12}")
    out.append(f"  {'HBM':<15} {metrics_lib.format_bytes(self.hbm_bytes):>12}  "
               f"({100 * m.get('total', 0) / self.hbm_bytes:.1f}% used) -> "
               f"{'fits' if self.fits else 'DOES NOT FIT'}")
    if self.flops_per_step:
      out.append(f"model FLOPs per step per device: {self.flops_per_step:.3g} "
                 "(metrics.training_flops_per_token x tokens / devices)")
    return out


@dataclasses.dataclass(frozen=True)
class StepProgram:
  """The train step of a config, ready to lower: `jitted(state, batch, *rest)`.

  Attributes:
    jitted: the trainer's jitted step.
    state: the state as ShapeDtypeStructs with shardings.
    rest: further arguments, abstract (a fine-tune's frozen parameters and encoder).
    specs: every global batch shape the run can have, shortest first.
    num_params: parameters of the whole model.
    setup: the run's static setup (`state.Setup`, or a fine-tune's).
  """
  jitted: Any
  state: Any
  rest: tuple
  specs: list
  num_params: int
  setup: Any


def _masked_program(config: ml_collections.ConfigDict, mesh) -> StepProgram:
  """Stage 1 and S2A (`state.Setup`, `step.jit_train_step`)."""
  setup = train_state.make_setup(config)
  state = train_state.abstract_state(setup, mesh)
  specs = input_pipeline.configured_batch_specs(config)
  jitted = train_step_lib.jit_train_step(setup, config, mesh, train_state.state_shardings(setup, mesh), specs[-1])
  return StepProgram(jitted, state, (), specs, metis.count_params(state.params), setup)


def _finetune_program(config: ml_collections.ConfigDict, mesh) -> StepProgram:
  """A fine-tune (`finetune_objective`): frozen base and w2v-BERT encoder as abstract arguments,
  so no weights are read."""
  from metis_jax.training import finetune_objective as fto  # pylint: disable=import-outside-toplevel
  setup = fto.make_setup(config)
  encoder = encoder_shardings = None
  if setup.encoder is not None:
    from metis_jax.training import codec_state  # pylint: disable=import-outside-toplevel
    encoder_shardings = codec_state.encoder_shardings(setup.encoder, mesh, setup.rules)
    encoder = codec_state.abstract_encoder(setup.encoder, mesh, setup.rules)
  spec = fto.batch_spec(config)  # fine-tune batches have one length, train.seq_length
  jitted = fto.jit_finetune_step(setup, config, mesh, spec, encoder_shardings)
  return StepProgram(jitted, fto.abstract_state(setup, mesh), (fto.abstract_frozen(setup, mesh), encoder), [spec],
                     metis.count_params(fto.param_shapes(setup)), setup)


def step_program(config: ml_collections.ConfigDict, mesh) -> StepProgram:
  """The train step of `config.model.kind`: 'metis', 's2a' or 'metis_finetune' (the codecs' GAN
  steps are not compiled here)."""
  kind = config.model.get("kind", "metis")
  if kind in ("metis", "s2a"):
    return _masked_program(config, mesh)
  if kind == "metis_finetune":
    return _finetune_program(config, mesh)
  raise cli_support.UserError(f"config.model.kind={kind!r}: the dry run compiles the steps of 'metis', 's2a' "
                              "and 'metis_finetune' configs; train the codecs with python -m metis_jax.train")


def compile_buckets(config: ml_collections.ConfigDict, devices: list, largest_only: bool = False):
  """Lowers and compiles the train step for every batch shape; returns (AheadCompiled, mesh, program)."""
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  program = step_program(config, mesh)
  specs = program.specs[-1:] if largest_only else program.specs
  ahead = compile_ahead.compile_ahead(program.jitted, program.state, specs, *program.rest)
  return ahead, mesh, program


def compile_train_step(config: ml_collections.ConfigDict, devices: list):
  """The train step compiled at its largest batch shape; returns (compiled, mesh, setup, state)."""
  ahead, mesh, program = compile_buckets(config, devices, largest_only=True)
  compiled, = ahead.executables.values()
  return compiled, mesh, program.setup, program.state


def dry_run(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
            hbm_bytes: Optional[int] = None, largest_only: bool = False) -> CompileReport:
  """Compiles every batch shape of `config` for `topology` and reports the per-device memory."""
  target = parse_topology(topology)
  devices = target_devices(target, num_slices)
  ahead, mesh, program = compile_buckets(config, devices, largest_only)
  # (XLA's cost_analysis counts a scanned layer once, not num_layers times.)
  tokens = config.train.global_batch_size * config.train.seq_length
  flops = (metrics_lib.training_flops_per_token(config.model, config.train.seq_length) * tokens
           / mesh.devices.size)
  return CompileReport(
      target=f"{topology}" + (f" x {num_slices} slices" if num_slices > 1 else ""),
      mesh=mesh_lib.describe(mesh), num_params=program.num_params, buckets=ahead.buckets,
      hbm_bytes=hbm_bytes or target.hbm_bytes, flops_per_step=flops, seconds=ahead.seconds)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing is free)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("topology", "cpu-8", "v4-N, v5p-N, v5e-N, v6e-N or cpu-N.")
  flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice TPU over DCN).")
  flags.DEFINE_float("hbm_gib", 0.0, "Override the per-device memory limit (GiB).")
  flags.DEFINE_bool("largest_bucket_only", False,
                    "Compile only the largest batch shape (train.seq_length), not every length bucket.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  hbm = int(FLAGS.hbm_gib * GiB) if FLAGS.hbm_gib > 0 else None
  try:
    report = dry_run(FLAGS.config, FLAGS.topology, FLAGS.num_slices, hbm, FLAGS.largest_bucket_only)
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(report.lines()))
  if not report.fits:
    print(f"error: the train step needs {metrics_lib.format_bytes(report.memory['total'])} per "
          f"device at its largest batch {report.largest.shape}, more than the "
          f"{metrics_lib.format_bytes(report.hbm_bytes)} available", file=sys.stderr)
    return 1
  return 0



def run_main() -> None:
  """`python -m metis_jax.train_compile`."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
