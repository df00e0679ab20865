"""The pure training step: corruption, forward, masked cross-entropy, gradients, update.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function of
arrays; `jit_train_step` compiles it for a mesh with explicit in/out
shardings and the state donated. What is corrupted and scored comes from the
run's objective (`train_objectives`, by `config.model.kind`: stage-1 SSL
tokens or S2A codec layers); the rest (micro-batches, clipping, the skip of
non-finite updates, metrics) is shared. Compute runs in `config.model.dtype`
(bfloat16 at scale) on float32 master weights (`config.model.param_dtype`);
logits, the loss and the gradients are float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import optimizer as optimizer_lib
from metis_jax.training import update as update_lib
from metis_jax.training import objectives as train_objectives
from metis_jax.training.state import Setup, TrainState

Batch = dict[str, jax.Array]
# Keys a stage-1 batch must carry (an objective's `batch_keys` in general).
BATCH_KEYS = train_objectives.MetisObjective.batch_keys


def check_batch(batch: Batch, keys: tuple[str, ...] = BATCH_KEYS, kind: str = "metis") -> None:
  """Rejects batches the objective cannot train on correctly, with the reason."""
  train_objectives.check_batch_keys(batch, keys, kind)


def split_microbatches(x: jax.Array, num: int) -> jax.Array:
  """`[batch, ...]` -> `[num, batch // num, ...]`, micro-batch a = rows a, a + num, ...

  Rows are interleaved (not blocked) so that each device's contiguous shard
  of the batch splits into its own shards of every micro-batch: no data moves.
  """
  batch = x.shape[0]
  if batch % num:
    raise ValueError(f"batch {batch} is not divisible by grad_accum_steps {num}")
  return jnp.swapaxes(x.reshape(batch // num, num, *x.shape[1:]), 0, 1)


def accumulate_gradients(loss_fn, params: Any, micro: Any, num: int):
  """Sums value_and_grad of `loss_fn(params, micro_i)` over micro-batches.

  Args:
    loss_fn: `(params, batch) -> (loss_sum, (correct, count))`.
    params: parameters.
    micro: pytree of `[num, micro_batch, ...]` arrays.
    num: number of micro-batches (static).

  Returns:
    ((loss_sum, (correct, count)), grad_sum), all sums over micro-batches.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num == 1:
    return grad_fn(params, jax.tree.map(lambda x: x[0], micro))

  def body(carry, batch):
    out = grad_fn(params, batch)
    return jax.tree.map(jnp.add, carry, out), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = ((jnp.zeros(()), (jnp.zeros(()), jnp.zeros(()))), zeros)
  out, _ = jax.lax.scan(body, init, micro, length=num)
  return out


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, setup: Setup,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch.

  Args:
    state: the training state.
    batch: the objective's `batch_keys`: `tokens` int32 `[batch, time]` (SSL
      tokens), `valid` bool `[batch, time]`, and for S2A `acoustic_tokens`
      int32 `[batch, time, num_quantizers]`.
    rng: PRNG key of this step (corruption draws).
    setup: objective (model), optimizer and rules (static).
    config: the run config (static; `train` is read).

  Returns:
    (new state, metrics): scalar float32 metrics `loss`, `accuracy`,
    `grad_norm` (before clipping), `learning_rate`, `scored_tokens`,
    `valid_tokens`, `skipped` (1.0 if this update was skipped),
    `skipped_steps` (running count), and the objective's shared draws
    (S2A: `target_layer`).
  """
  objective = setup.objective
  check_batch(batch, objective.batch_keys, objective.kind)
  cfg = config.train
  num_micro = int(cfg.grad_accum_steps)
  valid = batch["valid"].astype(bool)
  # One corruption draw for the whole global batch: accumulation does not change it.
  rows, shared = objective.draw(rng, batch)
  micro = jax.tree.map(lambda x: split_microbatches(x, num_micro), (batch, rows))
  batch_axes = mesh_lib.BATCH_AXES

  def loss_fn(params, mb):
    mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))), mb)
    return objective.loss(params, mb[0], mb[1], shared)

  sums = accumulate_gradients(loss_fn, state.params, micro, num_micro)
  new_state, metrics = apply_token_mean_update(state, setup.optimizer, cfg, sums)
  metrics = dict(metrics, valid_tokens=valid.sum().astype(jnp.float32), **shared)
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def apply_token_mean_update(state, optimizer, cfg: ml_collections.ConfigDict, sums):
  """Gradient sums over the scored tokens -> guarded update of `state.params`.

  Shared by every masked-token step (pre-training, S2A, fine-tunes).

  Args:
    state: a state with `step`, `params`, `opt_state`, `skipped_steps`.
    optimizer: its `optimizer.Optimizer`.
    cfg: `config.train` (`inject_nan_at_step`, `skip_nonfinite`, the schedule).
    sums: `accumulate_gradients`' ((loss sum, (correct, count)), gradient sum).

  Returns:
    (new state, metrics: `loss`, `accuracy`, `grad_norm`, `learning_rate`,
    `scored_tokens`, `skipped`, `skipped_steps`).
  """
  (loss_sum, (correct, count)), grad_sum = sums
  denom = jnp.maximum(count, 1.0)
  loss, accuracy = loss_sum / denom, correct / denom
  poison = state.step + 1 == cfg.inject_nan_at_step if cfg.inject_nan_at_step >= 0 else None
  new_params, new_opt_state, grad_norm, skipped = update_lib.guarded_update(
      optimizer, grad_sum, state.opt_state, state.params, loss, cfg.skip_nonfinite, poison,
      grad_scale=1.0 / denom)
  skipped_steps = state.skipped_steps + skipped.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                            skipped_steps=skipped_steps)
  # The schedule advances with applied updates only (optax's own count).
  applied = state.step - state.skipped_steps
  metrics = dict(loss=loss, accuracy=accuracy, grad_norm=grad_norm,
                 learning_rate=optimizer_lib.learning_rate_schedule(cfg)(applied),
                 scored_tokens=count, skipped=skipped.astype(jnp.float32),
                 skipped_steps=skipped_steps.astype(jnp.float32))
  return new_state, metrics


def step_rng(state: TrainState) -> jax.Array:
  """The PRNG key of the step about to run: fold_in(base key, step)."""
  return update_lib.step_key(state.rng, state.step)


def batch_shardings(mesh: Mesh, batch_spec: dict[str, Any]) -> dict[str, NamedSharding]:
  """Batch over data x fsdp for every array of the batch (by rank)."""
  return {k: mesh_lib.batch_sharding(mesh, len(v.shape)) for k, v in batch_spec.items()}


def jit_train_step(setup: Setup, config: ml_collections.ConfigDict, mesh: Mesh,
                   state_shardings: TrainState, batch_spec: dict[str, Any]):
  """Compiles `(state, batch) -> (state, metrics)` for `mesh`.

  The step's key is derived from the state inside the jit (no host-side
  inputs besides the batch). In/out shardings are explicit; the state is
  donated, so its buffers are reused for the new state.

  Args:
    setup: from `train_state.make_setup`.
    config: the run config.
    mesh: device mesh.
    state_shardings: TrainState of NamedShardings.
    batch_spec: {name: array or ShapeDtypeStruct} (only shapes are used).
  """
  pure = functools.partial(train_step, setup=setup, config=config)

  def step(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(setup.rules):
      return pure(state, batch, step_rng(state))

  return jax.jit(step, in_shardings=(state_shardings, batch_shardings(mesh, batch_spec)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
