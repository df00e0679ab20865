"""What the one training loop trains: the `Objective` protocol.

`training/loop.py` does what every run needs, once: the mesh, `config.json`,
restore or fresh state, the data iterator in every checkpoint, the profile
window, SIGTERM (save and stop), metrics (TensorBoard, `metrics.jsonl`, the
progress line, skip counts), periodic and final Orbax checkpoints (never of a
non-finite state) and the export at the end. An `Objective` supplies what
differs, chosen by `config.model.kind` (`loop.OBJECTIVES`):

  kind              objective                          state                         step
  'metis'           masked_objective.MaskedObjective   state.TrainState              step.train_step: masked CE of SSL tokens
  's2a'             masked_objective.MaskedObjective   state.TrainState              step.train_step: one codec layer per batch
  'acoustic_codec'  codec_objective.CodecObjective     codec_state.CodecTrainState   codec_step: generator, then discriminator (GAN)
  'semantic_codec'  codec_objective.CodecObjective     codec_state.CodecTrainState   codec_step.semantic_step
  'metis_finetune'  finetune_objective.FinetuneObjective  finetune_objective.FinetuneState  finetune_step: masked CE of
                    target tokens, trainable subset only

A state is a `flax.struct` pytree with at least `step` (int32 scalar, batches
consumed) and `params`; the loop saves and restores it whole (Orbax item
'state'), so its tree structure is the checkpoint layout. Every step
guards its update (`update.guarded_update`): a non-finite loss or gradient
skips it, the state counts it (`skipped_steps`) and the metrics say so
(`skipped`).

Fine-tuning (frozen base, trainable subset; `finetune_objective.py`) is one more objective,
without changes to the loop: `create_state`/`abstract_state` hold only the
trainable subset (LoRA factors, the frame-level adapter) and the optimizer
state of that subset (its own optimizer), so checkpoints carry only what changes;
`compile` loads the frozen base parameters once, sharded by the same logical
rules (as `codec_objective` does with the frozen w2v-BERT encoder of the
semantic codec), and binds them to the jitted step as a separate,
non-donated argument with its own shardings; the loss is
`loss(trainable, frozen, batch)` differentiated in its first argument only
(`jax.value_and_grad(argnums=0)`); `export` writes the adapter (or the merged
weights) in the layout the inference loaders read.
"""

import dataclasses
from typing import Any, Callable, Optional, Protocol

import jax
import ml_collections
from jax.sharding import Mesh

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Progress:
  """How the loop reports throughput and prints the progress line.

  Attributes:
    unit: what a step consumes; the logged rate is `<unit>_per_second`
      ('tokens', 'audio_seconds').
    units_per_step: that amount per global batch.
    line: `(step, total_steps, values) -> str`, the progress line of a logged step.
    flops_per_unit: model FLOPs of one unit; when positive the loop adds `mfu`.
  """
  unit: str
  units_per_step: float
  line: Callable[[int, int, dict], str]
  flops_per_unit: float = 0.0


class Steps(Protocol):
  """The compiled steps of one run (jitted for a mesh, the state donated)."""

  def start(self, state: Any, batch: Batch) -> Any:
    """The state to train from, given a fresh run's first batch (e.g. codebooks drawn from it)."""

  def __call__(self, state: Any, batch: Batch) -> tuple[Any, dict[str, jax.Array]]:
    """One training step -> (state with `step + 1`, float32 scalar metrics on device)."""

  # Optional: `compile_ahead(state, specs) -> (Steps, compile_ahead.AheadCompiled)`, the same
  # steps with the step compiled for every batch spec; the loop calls it before the first step
  # so that no step compiles. Steps without it compile at their first call.


class Objective(Protocol):
  """What one kind of run trains; see the module docstring."""

  kind: str

  def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config the run trains with (e.g. the demo corpus built under `workdir` as its data)."""

  def state_shardings(self, mesh: Mesh) -> Any:
    """State-shaped pytree of NamedShardings (from the logical axis rules)."""

  def abstract_state(self, mesh: Mesh) -> Any:
    """The state as `jax.ShapeDtypeStruct`s carrying their shardings (the restore target)."""

  def create_state(self, mesh: Mesh, seed: int) -> Any:
    """A fresh state, created directly in its sharded layout."""

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch."""

  # Optional: `batch_specs(config) -> list of batch_spec`, every global batch shape the run's
  # data can produce (length buckets); the loop compiles the step for each ahead. Without it,
  # `[batch_spec()]`.

  def data_iterator(self, config: ml_collections.ConfigDict, mesh: Mesh, process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> Any:
    """Global batches for this process; checkpointable (`get_state`/`set_state`), `.local` the host iterator."""

  def compile(self, config: ml_collections.ConfigDict, mesh: Mesh) -> Steps:
    """The jitted, sharded steps (frozen inputs such as an encoder are created here and bound)."""

  def progress(self, config: ml_collections.ConfigDict) -> Progress:
    """Throughput unit and progress line."""

  def describe(self, state: Any, config: ml_collections.ConfigDict) -> str:
    """One log line: what is trained, parameter counts, batch."""

  def export(self, state: Any, workdir: str) -> list[str]:
    """Writes the final product into `workdir` (all processes call it); returns the paths written."""
