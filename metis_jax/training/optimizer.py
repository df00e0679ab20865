"""AdamW with warmup + cosine/linear decay, gradient clipping and a weight-decay mask.

Gradient accumulation is not an optax wrapper here: `train_step` scans over
micro-batches and sums their gradients before a single update (see
`train_step.accumulate_gradients`), which keeps the loss normalization exact
and the optimizer state free of accumulation buffers.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

DECAYS = ("cosine", "linear", "constant")


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then decay to `end_learning_rate_ratio * peak` at `steps`.

  Args:
    cfg: `config.train`.

  Returns:
    A function of the optimizer step count (int) to the learning rate.
  """
  peak = cfg.learning_rate
  end = peak * cfg.end_learning_rate_ratio
  warmup = max(int(cfg.warmup_steps), 0)
  decay_steps = max(int(cfg.steps) - warmup, 1)
  if cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.decay == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown train.decay {cfg.decay!r}; expected one of {DECAYS}")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def decays(path_names: list[str], ndim: int) -> bool:
  """Whether one parameter gets weight decay.

  Decayed: matmul kernels (`kernel` leaves of Dense/DenseGeneral layers) in
  attention, MLPs, the time-step/phone/adapter MLPs and the output head.
  Not decayed:
    * biases and scalars (the adapter's `gate_scale`): few numbers, and
      decaying them only biases the function;
    * the adaptive norms (`*_norm/to_weight`, kernel and bias): they produce
      per-feature gains whose scale should not be pulled to 0;
    * embeddings (`token_embed`, `phone_embed`, `mask_embedding`): rows of
      rare tokens are updated rarely, so decay would shrink them toward 0
      between updates (the usual practice for LLM embeddings).
  """
  if ndim < 2 or not path_names or path_names[-1] != "kernel":
    return False
  return not any(name.endswith("norm") for name in path_names)


def weight_decay_mask(params: Any) -> Any:
  """Pytree of bools like `params` (boxed or not): True where weight decay applies."""
  unboxed = nn.unbox(params)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: decays(_path_names(path), jnp.ndim(x)), unboxed)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` that can reuse the norm the step already computed.

  `update(updates, state, params, grad_norm=norm)` clips with `norm` (the caller's
  `optax.tree.norm(updates)`, as `update.guarded_update` computes for its metrics and its
  finiteness check) instead of computing it a second time; without `grad_norm` it computes
  it. Same state (`EmptyState`, so checkpoints keep their layout) and the same arithmetic
  as optax's: updates are kept when norm < max_norm, else scaled by max_norm / norm.
  """

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    keep = jnp.squeeze(norm < max_norm)
    clip = lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """clip_by_global_norm -> AdamW (decoupled decay on the mask above), scheduled.

  The update takes the global gradient norm as `grad_norm=` (see `clip_by_global_norm`).

  Args:
    cfg: `config.train`.
  """
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask))
  return optax.chain(*parts)
