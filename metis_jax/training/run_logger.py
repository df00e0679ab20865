"""The training loop's metrics logger: `metrics.MetricsLogger` with the objective's throughput and line.

Same one-step-late reads and TensorBoard scalars as `metrics.MetricsLogger`;
the throughput (`<unit>_per_second`, and `mfu` when the objective gives FLOPs
per unit) and the progress line come from the objective's
`objective.Progress`; every step's values (with the rates on logged steps)
also go to `<workdir>/metrics.jsonl` (`metrics.JsonlWriter`), one JSON line
per step (process 0, local workdirs). A resumed run (`resume_step`) drops
what an earlier run logged past that step, in metrics.jsonl and TensorBoard,
so each step appears once.
"""

from typing import Any, Optional

import ml_collections

from metis_jax.training import metrics as metrics_lib
from metis_jax.training import objective as objective_lib


class RunLogger(metrics_lib.MetricsLogger):
  """Args: workdir, config, progress (from the objective), num_devices, device_kind, is_writer,
  resume_step (the step the run starts from: 0 fresh, None appends to what is there)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, progress: objective_lib.Progress,
               num_devices: int, device_kind: str, is_writer: Optional[bool] = None,
               resume_step: Optional[int] = None):
    self._init_common(workdir, config, is_writer, resume_step)
    self.progress = progress
    self.num_devices = num_devices
    self.peak = metrics_lib.peak_flops_per_device(device_kind, config.logging.peak_flops_per_device)
    self.jsonl = metrics_lib.JsonlWriter(workdir, resume_step, self.is_writer)

  def _log(self, step: int, metrics: Any, finished_at: Optional[float] = None) -> dict[str, float]:
    values = super()._log(step, metrics, finished_at)
    self.jsonl.write(values)
    return values

  def _add_throughput(self, values: dict[str, float], steps_per_second: float) -> None:
    p = self.progress
    values["steps_per_second"] = steps_per_second
    values[f"{p.unit}_per_second"] = rate = steps_per_second * p.units_per_step
    if p.flops_per_unit > 0:
      values["mfu"] = metrics_lib.mfu(rate, p.flops_per_unit, self.num_devices, self.peak)

  def _progress_line(self, step: int, values: dict[str, float]) -> str:
    return self.progress.line(step, self.total_steps, values)

  def close(self) -> None:
    super().close()
    self.jsonl.close()
