"""Training metrics: FLOPs and MFU, the progress line, TensorBoard, metrics.jsonl, profiler windows.

The host reads a step's metrics only after the *next* step has been
dispatched (`MetricsLogger.push`), so fetching them never makes the device
wait. Only process 0 prints and writes. The progress line goes to stdout
(with an ETA from the measured step rate); a resumed run continues the
record: `JsonlWriter` and the TensorBoard writer drop what was logged past
the restored step, so each step appears once.
"""

import json
import os
import sys
import time
from typing import Any, Optional

import jax
import ml_collections
from absl import logging

# Peak dense bf16 FLOP/s per JAX device, by `device_kind` substring (checked
# in order; first match wins). TPU v4 and v5p run one JAX device per chip
# (megacore); GPU figures are the dense (no 2:4 sparsity) tensor-core peaks
# of the SXM parts.
PEAK_BF16_FLOPS = (
    ("tpu v6 lite", 918e12),   # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),   # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),        # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)
# CPUs have no meaningful bf16 peak; this nominal figure only keeps MFU
# defined (a few cores reach well under 1 TFLOP/s).
CPU_FALLBACK_FLOPS = 1e12


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
  """Peak bf16 FLOP/s of one device (`override` wins when positive)."""
  if override > 0:
    return float(override)
  kind = device_kind.lower()
  for key, flops in PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return CPU_FALLBACK_FLOPS


def training_flops_per_token(model: ml_collections.ConfigDict, seq_length: int) -> float:
  """Model FLOPs of one training token (forward + backward = 3x forward).

  Counts matmuls only (2 FLOPs per multiply-add): per layer the q/k/v/o
  projections (4 H^2), the SwiGLU MLP (3 H M) and the attention scores and
  values over *all* T keys (2 T H; bidirectional, so nothing is halved as a
  causal mask would allow), plus the output head (H V). S2A (`model.kind`
  's2a') adds its frame-wise condition MLP (2 H M) and has one head of V =
  its codebook size. Per-sample work (the time-step MLP and the
  adaptive-norm gains), embedding look-ups and rematerialization are not
  counted: this is the MFU convention (model, not hardware, FLOPs).

  Args:
    model: `config.model`.
    seq_length: T, tokens per sequence.
  """
  h, layers, vocab = model.hidden_size, model.num_layers, model.vocab_size
  mlp = model.mlp_ratio * h
  per_layer = 4 * h * h + 3 * h * mlp + 2 * seq_length * h
  frame_cond = 2 * h * mlp if model.get("kind", "metis") == "s2a" else 0
  forward = 2 * (layers * per_layer + h * vocab + frame_cond)
  return 3.0 * forward


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int,
        peak_per_device: float) -> float:
  """Model FLOPs utilization in [0, 1]."""
  return tokens_per_second * flops_per_token / (num_devices * peak_per_device)


def format_duration(seconds: float) -> str:
  """3725 -> '1h02m', 450 -> '7m30s', 42.4 -> '42s'."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def eta(step: int, total: int, values: dict[str, float]) -> str:
  """'ETA 7m30s' from the measured `steps_per_second`, or '' before a rate is measured."""
  rate = values.get("steps_per_second", 0.0)
  if rate <= 0 or step >= total:
    return ""
  return f"ETA {format_duration((total - step) / rate)}"


def format_count(value: float) -> str:
  """52300 -> '52.3k', 1.25e6 -> '1.25M', 40.4 -> '40.4', 3.14159 -> '3.14' (three significant digits)."""
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{suffix}"
  return f"{value:.3g}"


def progress_line(step: int, total: int, values: dict[str, float]) -> str:
  """'step 120/2000 | 3.1 step/s 50.2k tok/s | loss 4.123 acc 0.211 | gnorm 1.23 lr 3.0e-04 | MFU 41.2% | ETA 10m06s'."""
  timed = "steps_per_second" in values  # not the first step (it includes compilation)
  parts = [f"step {step}/{total}",
           (f"{format_count(values['steps_per_second'])} step/s {format_count(values['tokens_per_second'])} tok/s"
            if timed else "compiling"),
           f"loss {values['loss']:.4f} acc {values['accuracy']:.3f}",
           f"gnorm {values['grad_norm']:.3g} lr {values['learning_rate']:.2e}"]
  if timed:
    parts.append(f"MFU {100 * values['mfu']:.1f}%")
  if values.get("skipped_steps", 0):
    parts.append(f"skipped {int(values['skipped_steps'])}")
  if eta(step, total, values):
    parts.append(eta(step, total, values))
  return " | ".join(parts)


def _finished_at(metrics: Any) -> Optional[float]:
  """The time now if every array of `metrics` is computed already, else None.

  Dispatched asynchronously (accelerators), a step is still running when the loop
  queues its metrics, and its end is when their fetch, a step later, returns. Run
  inline (CPU train command, `host_memory.run_cpu_programs_inline`), it is done when
  queued, and the fetch a step later would time the next step instead (the last
  window, flushed right after, would take no time at all).
  """
  ready = all(getattr(leaf, "is_ready", lambda: True)() for leaf in jax.tree.leaves(metrics))
  return time.perf_counter() if ready else None


class JsonlWriter:
  """One JSON line of metrics per step into `<workdir>/metrics.jsonl` (process 0, local workdirs).

  A run resumed from step S first rewrites the file (atomically: a temporary
  file renamed over it) without the lines past S, which a killed run logged
  after its last checkpoint, and without a last line cut short by the kill;
  so each step appears once.

  Args:
    workdir: run directory.
    resume_step: the step the run starts from (0 for a fresh run, which
      starts a new file); None appends to whatever is there.
    is_writer: defaults to process 0.
  """

  FILE = "metrics.jsonl"

  def __init__(self, workdir: str, resume_step: Optional[int] = None, is_writer: Optional[bool] = None):
    self.file = None
    is_writer = jax.process_index() == 0 if is_writer is None else is_writer
    if not is_writer or "://" in workdir:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, self.FILE)
    if resume_step is not None:
      keep_lines_up_to(path, resume_step)
    self.file = open(path, "a")

  def write(self, values: Optional[dict]) -> None:
    if self.file is not None and values is not None:
      self.file.write(json.dumps(values) + "\n")
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None


def keep_lines_up_to(path: str, step: int) -> int:
  """Rewrites the JSON-lines file `path` keeping the well-formed lines with `step` <= `step`.

  Returns:
    How many lines were dropped (0 when the file does not exist).
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        values = json.loads(line)
        keep = int(values["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      elif line.strip():
        dropped += 1
  if dropped:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    logging.info("%s: dropped %d lines logged past the restored step %d", path, dropped, step)
  return dropped


class MetricsLogger:
  """Reads metrics one step late, writes TensorBoard scalars and the progress line.

  Args:
    workdir: run directory (`<workdir>/tensorboard` gets the event files).
    config: the run config.
    num_devices: devices in the mesh.
    device_kind: `jax.devices()[0].device_kind`.
    is_writer: only process 0 writes.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, num_devices: int,
               device_kind: str, is_writer: Optional[bool] = None, resume_step: Optional[int] = None):
    self._init_common(workdir, config, is_writer, resume_step)
    self.tokens_per_step = config.train.global_batch_size * config.train.seq_length
    self.flops_per_token = training_flops_per_token(config.model, config.train.seq_length)
    self.peak = peak_flops_per_device(device_kind, config.logging.peak_flops_per_device)
    self.num_devices = num_devices

  def _init_common(self, workdir: str, config: ml_collections.ConfigDict, is_writer: Optional[bool],
                   resume_step: Optional[int] = None) -> None:
    """What every run's logger holds: the schedule, the writer role, TensorBoard, the history.

    `resume_step`: the step a resumed run starts from; TensorBoard hides what
    an earlier run logged past it (a new event file with `purge_step`).
    """
    self.config = config
    self.total_steps = config.train.steps
    self.every = max(int(config.logging.log_every_steps), 1)
    self.is_writer = jax.process_index() == 0 if is_writer is None else is_writer
    self.writer = None
    if self.is_writer and config.logging.tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      purge = resume_step + 1 if resume_step else None
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
    self._pending: Optional[tuple[int, Any, Optional[float]]] = None
    self._window_start: Optional[tuple[int, float]] = None
    self._first_logged: Optional[int] = None
    self.history: list[dict[str, float]] = []

  def push(self, step: int, metrics: Any) -> Optional[dict[str, float]]:
    """Queues step `step`'s device metrics; fetches and logs the previous step's.

    Returns:
      The previous step's metrics as floats (with its `step`), or None.
    """
    previous, self._pending = self._pending, (step, metrics, _finished_at(metrics))
    return self._log(*previous) if previous else None

  def flush(self) -> Optional[dict[str, float]]:
    """Logs the queued step (blocks on it): call at the end and before exits."""
    previous, self._pending = self._pending, None
    return self._log(*previous) if previous else None

  def _log(self, step: int, metrics: Any, finished_at: Optional[float] = None) -> dict[str, float]:
    """Fetches and logs step `step`; its rates time the window to `finished_at` (when the step
    was seen done; None: still running when queued, so done when the fetch returns)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    values["step"] = step
    now = time.perf_counter() if finished_at is None else finished_at
    if self._window_start is None:
      self._window_start = (step, now)  # the first step includes compilation: not timed
      self._first_logged = step
    self.history.append(values)
    self._record(values)
    if step % self.every and step != self.total_steps:
      if step == self._first_logged and self.is_writer:
        self._print(step, values)  # a first line as soon as the step is compiled and run
      return values
    start_step, start_time = self._window_start
    if step > start_step:
      self._add_throughput(values, (step - start_step) / max(now - start_time, 1e-9))
    self._window_start = (step, now)
    if self.is_writer:
      self._print(step, values)
      if self.writer is not None:
        for name, value in values.items():
          if name != "step":
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()
    return values

  def _record(self, values: dict[str, float]) -> None:
    """Every step's values, as read (subclasses may also write them elsewhere)."""

  def _add_throughput(self, values: dict[str, float], steps_per_second: float) -> None:
    """Adds the logging window's rates to `values`: steps, tokens per second and MFU."""
    values["steps_per_second"] = steps_per_second
    values["tokens_per_second"] = steps_per_second * self.tokens_per_step
    values["mfu"] = mfu(values["tokens_per_second"], self.flops_per_token, self.num_devices, self.peak)

  def _progress_line(self, step: int, values: dict[str, float]) -> str:
    return progress_line(step, self.total_steps, values)

  def _print(self, step: int, values: dict[str, float]) -> None:
    """The progress line on stdout (every objective's line gets the ETA)."""
    line = self._progress_line(step, values)
    remaining = eta(step, self.total_steps, values)
    if remaining and "ETA" not in line:
      line = f"{line} | {remaining}"
    print(line, file=sys.stdout, flush=True)

  def close(self) -> None:
    self.flush()
    if self.writer is not None:
      self.writer.close()


class ProfileWindow:
  """Traces steps [start, start + num) with jax.profiler into `<workdir>/profile`."""

  def __init__(self, workdir: str, start: int, num: int):
    self.logdir = os.path.join(workdir, "profile")
    self.start, self.stop = start, start + num
    self.enabled = num > 0
    self.active = False

  def before_step(self, step: int) -> None:
    """Call with the step about to run (0-based count of finished steps)."""
    if self.enabled and not self.active and step == self.start:
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and step >= self.stop:
      self.end()

  def end(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile of steps [%d, %d) written to %s", self.start, self.stop, self.logdir)


def memory_summary(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled executable (arguments, outputs, temporaries...)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", ""): int(getattr(stats, f, 0)) for f in fields}
  # Donated arguments alias outputs: count those bytes once.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)

