r"""Masked-token accuracy of a trained model on held-out utterances, against two baselines.

  python -m metis_jax.train_eval --config configs/s2a_tiny.py --workdir /tmp/s2a_tiny
  python -m metis_jax.train_eval --config configs/tiny.py --workdir /tmp/metis_tiny \
      --heldout /data/shards_dev

The model of the newest checkpoint in `<workdir>` is scored as it was
trained: the training corruption of `config.masking` (prompt prefix, mask
ratio gamma(t) for t ~ U(0, 1)), drawn `--repeats` times with fixed keys, on
windows of `train.seq_length` tokens cut from every held-out utterance. The
accuracy is the argmax's over all masked positions. For S2A every predicted
codec layer is scored separately (and their mean reported). Baselines:
chance, 1 / vocabulary, and the majority code, which always predicts the
most frequent code of that layer in the *training* data (a model that learnt
only the marginal distribution scores this).

Without `--heldout`, a config trained on the demo corpus is evaluated on
its held-out utterances (S2A: `metis_jax.data.demo`, the last sentence of
each voice).
"""

import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from metis_jax.training import objectives as train_objectives

Example = dict[str, np.ndarray]


@dataclasses.dataclass
class LayerScore:
  """Masked-token accuracy of one scored layer (stage 1: the SSL tokens, layer -1)."""
  layer: int
  scored: int
  accuracy: float
  majority_accuracy: float


@dataclasses.dataclass
class EvalReport:
  """Held-out accuracy per layer with its baselines."""
  layers: list[LayerScore]
  chance: float
  utterances: int
  windows: int

  @property
  def accuracy(self) -> float:
    """Mean over layers."""
    return float(np.mean([s.accuracy for s in self.layers]))

  @property
  def majority_accuracy(self) -> float:
    return float(np.mean([s.majority_accuracy for s in self.layers]))

  def lines(self) -> list[str]:
    out = [f"held-out: {self.utterances} utterances, {self.windows} windows; chance {self.chance:.4f}",
           f"{'layer':>6}{'scored':>9}{'accuracy':>10}{'majority':>10}"]
    for s in self.layers:
      out.append(f"{s.layer if s.layer >= 0 else '-':>6}{s.scored:>9}{s.accuracy:>10.4f}{s.majority_accuracy:>10.4f}")
    out.append(f"{'mean':>6}{'':>9}{self.accuracy:>10.4f}{self.majority_accuracy:>10.4f}")
    return out


def read_examples(sources: Sequence[str], acoustic_layers: int) -> list[Example]:
  """Every record of `sources` as {'tokens' int32 [T], 'acoustic_tokens' [T, Q] if Q > 0}, in order."""
  from metis_jax.data import pipeline, shards  # pylint: disable=import-outside-toplevel
  out = []
  for spec in sources:
    for raw in shards.read_all(shards.list_shards(spec)):
      out.append(pipeline.decode_element(raw, acoustic_layers=acoustic_layers, source=spec))
  return out


def windows(examples: Sequence[Example], length: int, min_length: int = 1) -> list[Example]:
  """Cuts each example into consecutive windows of `length` frames (a last shorter one if >= min_length)."""
  out = []
  for ex in examples:
    n = len(ex["tokens"])
    for start in range(0, n, length):
      if min(length, n - start) >= min_length:
        out.append({k: v[start:start + length] for k, v in ex.items()})
  return out


def batches(examples: Sequence[Example], batch_size: int, length: int) -> list[dict[str, np.ndarray]]:
  """Padded batches `[batch_size, length]` (the last one filled with empty rows)."""
  from metis_jax.data import bucketing  # pylint: disable=import-outside-toplevel
  out = []
  for s in range(0, len(examples), batch_size):
    group = examples[s:s + batch_size]
    acoustic = [e["acoustic_tokens"] for e in group] if "acoustic_tokens" in group[0] else None
    out.append(bucketing.pad_batch([e["tokens"] for e in group], batch_size, length, acoustic))
  return out


def majority_codes(examples: Sequence[Example], vocab: int) -> np.ndarray:
  """The most frequent id per scored stream: `[Q]` for S2A (per codec layer), `[1]` for stage 1."""
  if "acoustic_tokens" in examples[0]:
    codes = np.concatenate([e["acoustic_tokens"] for e in examples])
    return np.array([np.bincount(codes[:, q], minlength=vocab).argmax() for q in range(codes.shape[1])])
  return np.array([np.bincount(np.concatenate([e["tokens"] for e in examples]), minlength=vocab).argmax()])


def evaluate(objective, params: Any, heldout: Sequence[Example], train_examples: Sequence[Example],
             batch_size: int, length: int, min_length: int = 1, repeats: int = 4,
             seed: int = 0) -> EvalReport:
  """Scores `params` on held-out examples (see the module docstring).

  Args:
    objective: from `train_objectives.make_objective`.
    params: model parameters (host or device arrays).
    heldout: examples from `read_examples`.
    train_examples: the training examples (for the majority baseline).
    batch_size, length: evaluation batch shape.
    min_length: shortest window kept.
    repeats: corruption draws per window.
    seed: of the draws.
  """
  vocab = train_objectives.vocab_size(objective)
  majority = jnp.asarray(majority_codes(train_examples, vocab))
  is_s2a = objective.kind == "s2a"
  layers = objective.predicted_layers() if is_s2a else (None,)
  params = jax.device_get(params)

  @jax.jit
  def score(params, batch, key, layer):
    rows, shared = objective.draw(key, batch, layer)
    _, (correct, count) = objective.loss(params, batch, rows, shared)
    scored = rows.is_masked & batch["valid"]
    guess = majority[shared["target_layer"]] if is_s2a else majority[0]
    return correct, count, jnp.sum(scored & (objective.targets(batch, shared) == guess))

  cut = windows(heldout, length, min_length)
  scores = []
  for layer in layers:
    totals = np.zeros(3)
    for b, batch in enumerate(batches(cut, batch_size, length)):
      for r in range(repeats):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), b), r)
        totals += np.asarray(score(params, batch, key, None if layer is None else jnp.int32(layer)))
    scores.append(LayerScore(-1 if layer is None else layer, int(totals[1]),
                             totals[0] / max(totals[1], 1), totals[2] / max(totals[1], 1)))
  return EvalReport(scores, 1.0 / vocab, len(heldout), len(cut))


def default_heldout(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The demo corpus's held-out shards of an S2A config trained on it."""
  from metis_jax.data import demo  # pylint: disable=import-outside-toplevel
  if not (config.data.demo_corpus and not config.data.train_sources and train_objectives.kind_of(config) == "s2a"):
    raise ValueError("no --heldout given, and the config is not an S2A config trained on the demo corpus "
                     "(only that one has a held-out split built in)")
  return demo.heldout_dir(os.path.join(workdir, "demo_data"), config.model.vocab_size)


def restore_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, int]:
  """(parameters, step) of the newest checkpoint in `<workdir>/checkpoints`."""
  from metis_jax.training import checkpointing, input_pipeline, state as train_state  # pylint: disable=import-outside-toplevel
  from metis_jax.parallel import mesh as mesh_lib
  mesh = mesh_lib.create_mesh(config.mesh)
  setup = train_state.make_setup(config)
  data = input_pipeline.make_train_iterator(config, mesh)  # restored alongside; unused
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = ckpt.restore(step, train_state.abstract_state(setup, mesh), data)
  finally:
    ckpt.close()
    if hasattr(data, "close"):
      data.close()
  return jax.device_get(state.params), step


def run(config: ml_collections.ConfigDict, workdir: str, heldout: Optional[str] = None,
        repeats: int = 4, params: Any = None) -> EvalReport:
  """Evaluates the run in `workdir` (or `params`) on `heldout` (default: the demo's held-out part)."""
  from metis_jax.training import masked_objective  # pylint: disable=import-outside-toplevel
  heldout = heldout or default_heldout(config, workdir)
  config = masked_objective.with_demo_data(config, workdir)
  if params is None:
    params, _ = restore_params(config, workdir)
  objective = train_objectives.make_objective(config)
  q = train_objectives.acoustic_layers(config)
  return evaluate(objective, params, read_examples([heldout], q),
                  read_examples(list(config.data.train_sources), q), config.train.global_batch_size,
                  config.train.seq_length, config.data.min_length, repeats, config.seed)


FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "The run's config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's directory (its newest checkpoint is evaluated).")
  flags.DEFINE_string("heldout", None, "Held-out shards (default: the demo corpus's held-out part).")
  flags.DEFINE_integer("repeats", 4, "Corruption draws per held-out window.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from metis_jax.training import loop as train  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.get_absl_handler().addFilter(train._QuietLibraries())  # pylint: disable=protected-access
  report = run(FLAGS.config, FLAGS.workdir, FLAGS.heldout, FLAGS.repeats)
  print("\n".join(report.lines()))
  return 0



def run_main() -> None:
  """`python -m metis_jax.train_eval`."""
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
