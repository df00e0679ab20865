r"""Fine-tuning Metis (SE, TSE, VC, TTS, L2S, Omni) from a frozen base: the loop's 'metis_finetune' objective.

  python -m metis_jax.train --config configs/metis_se.py --workdir gs://B/se \
      --config.finetune.base=metis_base/model.safetensors \
      --config.data.train_sources='("gs://B/task_shards",)' --config.finetune.noise_dirs='("/data/dns",)'
  python -m metis_jax.train --config configs/finetune_tiny.py:se --workdir /tmp/ft_se \
      --config.finetune.base=/tmp/metis_tiny            # the default job's tiny base, demo corpus

What trains (`config.finetune`, see config_base.finetune_config):
  task       se | tse | vc | tts | l2s | omni: the batches of `data.tasks` (made on the fly
             from one clean tokenized corpus; on the demo corpus with `data.demo_corpus`).
  trainable  `training.trainable` groups: lora+adapter (SE/TSE/VC), lora+phones (TTS),
             adapter, full (L2S, Omni).
  base       the frozen base (`finetune_base`: workdir, converted folder or released file).

State (`FinetuneState`): only the trainable subset of the parameters (a pruned
tree: LoRA factors, adapter, ... or everything for `full`), the optimizer
state of that subset alone, step, RNG, skip count, and the base's content hash
(uint32 `[8]`, checked at resume: `finetune_base.check_same_base`). The frozen
parameters are loaded once in `compile`, sharded by the same logical rules,
and passed to the jitted step as a separate, non-donated argument; the loss is
differentiated in the trainable tree only (`jax.value_and_grad`, argnums 0),
so no gradient and no optimizer moment exists for a frozen weight.

Loss (`sample_finetune_mask`): the stage-1 corruption with the prompt taken
from the task batch (`prompt_lengths`): t ~ U(0, 1], mask ratio max(gamma(t),
`masking.min_mask_ratio`) on target positions only (>= prompt_lengths), at
least one per row, the prompt kept visible; with probability
`finetune.prompt_drop_prob` a row's prompt (and its phones) is dropped, i.e.
made padding, which is exactly the unconditional branch of CFG at decoding
(target alone, adapter features kept). Cross-entropy over the masked target
tokens, from the hidden states chunk by chunk (`finetune_loss` ->
`metis.training_loss`: no float32 `[B, T, vocab]` logits).

Condition features `[B, T, cond_feature_dim]`, frame t on token t of [prompt;
target], zero where a row has no condition (Omni's TTS rows) and past its length;
on an Omni batch's unconditioned rows the adapter adds exactly 0
(`condition_rows`), as when those tasks are decoded:
  * `model.cond_feature = 'cheap'` (tiny configs): `cond_features` from the batch
    (160-d log-mel pairs, `data.condition_features`);
  * 'w2v_bert': normalized w2v-BERT 2.0 layer-17 features computed in the step
    by the frozen encoder (`config.features`, as the semantic codec:
    `codec_step.input_features`) from the batch's 16 kHz `cond_audio`;
  * L2S: the batch's `visual` (x2-interpolated lip features, zeros on the prompt).
A batch that already carries `cond_features` of the adapter's width uses them
as they are (benchmarks compile without the encoder that way).

Export (process 0) under `<workdir>/export/`: `model/` (a converted folder,
LoRA merged: `python -m metis_jax.decode --task se --model <workdir>/export/model`),
and the released layout: `base.safetensors` + `lora.safetensors` +
`adapter.safetensors` (LoRA / gated adapter fine-tunes) or `model.safetensors`
(full fine-tunes, ungated adapters) via `conversion.finetune`.
"""

import collections
import dataclasses
import functools
import os
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metis_jax.models import masking
from metis_jax.models import metis
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import compile_ahead as compile_ahead_lib
from metis_jax.training import finetune_base
from metis_jax.training import input_pipeline
from metis_jax.training import metrics as metrics_lib
from metis_jax.training import objective as objective_lib
from metis_jax.training import optimizer as optimizer_lib
from metis_jax.training import step as step_lib
from metis_jax.training import trainable as trainable_lib
from metis_jax.training import update as update_lib

KIND = "metis_finetune"
TASKS = ("se", "tse", "vc", "tts", "l2s", "omni")
AUDIO_TASKS = ("se", "tse", "vc")
CHEAP_DIM = 160
VISUAL_DIM = 768
FinetuneError = finetune_base.FinetuneError
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class FinetuneState:
  """What a fine-tune checkpoint holds (the loop saves it whole).

  Attributes:
    step: int32 scalar, batches consumed.
    params: the trainable parameters only (a pruned tree of the model's parameters).
    opt_state: optax state of `params`.
    rng: uint32 `[2]` key data of the run's PRNG (step s uses fold_in(key, s)).
    skipped_steps: int32 scalar, non-finite updates skipped.
    base_hash: uint32 `[8]`, sha256 of the frozen base's parameters.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array
  base_hash: jax.Array


# ----------------------------------------------------------------------------- trees


_DROP = object()


def select(tree: Any, mask: Any, keep: bool) -> Any:
  """The leaves of a nested-dict `tree` whose `mask` equals `keep`, empty branches pruned."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      sub = select(v, mask[k], keep)
      if sub is _DROP or (isinstance(sub, dict) and not sub):
        continue
      out[k] = sub
    return out
  return tree if bool(mask) == keep else _DROP


def graft(trainable: Any, frozen: Any) -> Any:
  """The full parameter tree from its two disjoint halves (nested dicts, as `select` makes them)."""
  if not isinstance(trainable, dict) or not isinstance(frozen, dict):
    return trainable
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = graft(v, frozen[k]) if k in frozen else v
  return out


def _lookup(tree: Any, path: tuple) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _keys(path) -> tuple:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class FinetuneSetup:
  """The static pieces of a fine-tune, built once from the config.

  Attributes:
    model: the fine-tuned `MetisModel` (base + LoRA / adapter / phones).
    optimizer: optimizer of the trainable subset.
    rules: logical axis rules.
    task: one of TASKS.
    trainable: `finetune.trainable` spec.
    masking: corruption rules (`config.masking`).
    prompt_drop_prob: `finetune.prompt_drop_prob`.
    cond_feature: 'cheap' | 'w2v_bert' (`model.cond_feature`).
    encoder: w2v-BERT config of the frozen feature encoder (None unless
      audio features are computed in the step).
  """
  model: metis.MetisModel
  optimizer: optimizer_lib.Optimizer
  rules: tuple
  task: str
  trainable: str
  masking: masking.MaskingConfig
  prompt_drop_prob: float
  cond_feature: str
  encoder: Any = None

  @property
  def audio_condition(self) -> bool:
    return self.task in AUDIO_TASKS or self.task == "omni"


_EncoderSetup = collections.namedtuple("_EncoderSetup", "encoder rules")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses a fine-tune config that cannot train, naming the key."""
  f, m = config.finetune, config.model
  if f.task not in TASKS:
    raise FinetuneError(f"finetune.task={f.task!r}: choose one of {TASKS}")
  if f.task != "tts" and not m.cond_feature_dim:
    raise FinetuneError(f"finetune.task={f.task!r} needs a condition adapter: set model.cond_feature_dim")
  if f.task in ("tts", "omni") and not m.use_phone_cond:
    raise FinetuneError(f"finetune.task={f.task!r} needs phones: set model.use_phone_cond=True")
  if f.task == "l2s" and m.cond_feature_dim != VISUAL_DIM:
    raise FinetuneError(f"finetune.task='l2s' reads {VISUAL_DIM}-d visual features: set "
                        f"model.cond_feature_dim={VISUAL_DIM}")
  if f.task == "omni" and "l2s" in tuple(f.omni_tasks):
    raise FinetuneError("finetune.omni_tasks: Omni mixes audio-conditioned tasks and TTS; remove 'l2s'")
  if (f.task in AUDIO_TASKS or f.task == "omni") and m.cond_feature == "cheap" and m.cond_feature_dim != CHEAP_DIM:
    raise FinetuneError(f"model.cond_feature='cheap' gives {CHEAP_DIM}-d features: set "
                        f"model.cond_feature_dim={CHEAP_DIM}")
  if m.cond_feature not in ("cheap", "w2v_bert"):
    raise FinetuneError(f"model.cond_feature={m.cond_feature!r}: use 'w2v_bert' or 'cheap'")


def make_setup(config: ml_collections.ConfigDict, with_encoder: bool = True) -> FinetuneSetup:
  """The setup of `config` (checked); `with_encoder=False` skips the w2v-BERT config (benchmarks)."""
  check_config(config)
  f = config.finetune
  encoder = None
  audio = f.task in AUDIO_TASKS or f.task == "omni"
  if with_encoder and audio and config.model.cond_feature == "w2v_bert":
    from metis_jax.training import codec_state  # pylint: disable=import-outside-toplevel
    encoder = codec_state.encoder_config(config)
  return FinetuneSetup(
      model=metis.MetisModel(metis.MetisConfig.from_config(config.model)),
      optimizer=optimizer_lib.make_optimizer(config.train), rules=mesh_lib.logical_rules(config),
      task=f.task, trainable=f.trainable, masking=masking.MaskingConfig.from_config(config.masking),
      prompt_drop_prob=float(f.prompt_drop_prob), cond_feature=config.model.cond_feature, encoder=encoder)


def param_shapes(setup: FinetuneSetup, boxed: bool = False) -> Any:
  """The full model's parameters as ShapeDtypeStructs (boxed: with logical axis metadata)."""
  def init():
    variables = setup.model.init(jax.random.key(0), **setup.model.init_inputs())
    return variables["params"] if boxed else nn.unbox(variables["params"])
  return jax.eval_shape(init)


def trainable_mask(setup: FinetuneSetup) -> Any:
  try:
    return trainable_lib.trainable_mask(param_shapes(setup), setup.trainable)
  except ValueError as e:
    raise FinetuneError(f"finetune.trainable={setup.trainable!r}: {e}") from e


def init_fn(setup: FinetuneSetup, seed: int, boxed: bool = False):
  """A zero-argument function building a fresh FinetuneState (trainable leaves freshly initialized)."""
  mask = trainable_mask(setup)

  def init() -> FinetuneState:
    init_rng, run_rng = jax.random.split(jax.random.key(seed))
    variables = setup.model.init(init_rng, **setup.model.init_inputs())
    params = variables["params"] if boxed else nn.unbox(variables["params"])
    train = select(params, mask, True)
    return FinetuneState(step=jnp.zeros((), jnp.int32), params=train, opt_state=setup.optimizer.init(train),
                         rng=jax.random.key_data(run_rng), skipped_steps=jnp.zeros((), jnp.int32),
                         base_hash=jnp.zeros((8,), jnp.uint32))

  return init


def state_shardings(setup: FinetuneSetup, mesh: Mesh) -> FinetuneState:
  specs = nn.get_partition_spec(jax.eval_shape(init_fn(setup, 0, boxed=True)))
  return nn.logical_to_mesh_sharding(specs, mesh, setup.rules)


def frozen_shardings(setup: FinetuneSetup, mesh: Mesh) -> dict:
  """The frozen half's NamedShardings (same logical rules as the trainable half)."""
  specs = nn.get_partition_spec(param_shapes(setup, boxed=True))
  return select(nn.logical_to_mesh_sharding(specs, mesh, setup.rules), trainable_mask(setup), False)


def abstract_state(setup: FinetuneSetup, mesh: Mesh) -> FinetuneState:
  shapes = jax.eval_shape(init_fn(setup, 0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      state_shardings(setup, mesh))


def abstract_frozen(setup: FinetuneSetup, mesh: Mesh) -> dict:
  frozen = select(param_shapes(setup), trainable_mask(setup), False)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), frozen,
                      frozen_shardings(setup, mesh))


# ----------------------------------------------------------------------------- corruption and features


def sample_finetune_mask(rng: jax.Array, valid: jax.Array, prompt_lengths: jax.Array,
                         cfg: masking.MaskingConfig, prompt_drop_prob: float):
  """The stage-1 corruption with the batch's prompts (module doc).

  Args:
    rng: PRNG key.
    valid: `[batch, length]` bool, real tokens (a prefix per row).
    prompt_lengths: `[batch]` int, prompt tokens at the front of each row.
    cfg: mask schedule and minimum ratio.
    prompt_drop_prob: probability of dropping a row's prompt (CFG training).

  Returns:
    (TrainingMask, seq_valid `[batch, length]` bool (prompt positions of dropped
    rows made padding), dropped `[batch]` bool).
  """
  k_t, k_drop, k_mask = jax.random.split(rng, 3)
  batch, length = valid.shape
  valid = valid.astype(bool)
  prompt_lengths = prompt_lengths.astype(jnp.int32)
  t = jnp.clip(jax.random.uniform(k_t, (batch,)), 1e-5, 1.0)
  ratio = jnp.maximum(masking.mask_ratio(t, cfg.schedule), cfg.min_mask_ratio)
  index = jnp.arange(length)[None, :]
  is_prompt = (index < prompt_lengths[:, None]) & valid
  candidates = valid & ~is_prompt
  is_masked = candidates & jax.random.bernoulli(k_mask, ratio[:, None], (batch, length))
  first_target = (index == prompt_lengths[:, None]) & candidates
  is_masked = jnp.where(is_masked.any(-1, keepdims=True), is_masked, first_target)
  dropped = jax.random.bernoulli(k_drop, prompt_drop_prob, (batch,)) & (prompt_lengths > 0)
  seq_valid = valid & ~(is_prompt & dropped[:, None])
  mask = masking.TrainingMask(t=t, ratio=ratio, prompt_lengths=jnp.where(dropped, 0, prompt_lengths),
                              is_prompt=is_prompt & ~dropped[:, None], is_masked=is_masked)
  return mask, seq_valid, dropped


def _fit_frames(feat: jax.Array, length: int) -> jax.Array:
  frames = feat.shape[1]
  if frames >= length:
    return feat[:, :length]
  return jnp.pad(feat, ((0, 0), (0, length - frames), (0, 0)))


def condition_features(setup: FinetuneSetup, encoder: Any, batch: Batch) -> Optional[jax.Array]:
  """Adapter input `[batch, length, cond_feature_dim]` float32 (module doc), or None without an adapter."""
  dim = setup.model.config.cond_feature_dim
  if not dim:
    return None
  length = batch["tokens"].shape[1]
  if setup.task == "l2s":
    return _fit_frames(batch["visual"].astype(jnp.float32), length)
  if "cond_features" in batch:
    feat = _fit_frames(batch["cond_features"].astype(jnp.float32), length)
    frames = batch["cond_lengths"].astype(jnp.int32)
  else:
    from metis_jax.training import codec_step  # pylint: disable=import-outside-toplevel
    feat, valid = codec_step.input_features(_EncoderSetup(setup.encoder, setup.rules), encoder,
                                            {"wav": batch["cond_audio"], "lengths": batch["cond_audio_lengths"]})
    feat = _fit_frames(feat, length)
    frames = jnp.where(batch["cond_audio_lengths"] > 0, valid.sum(-1), 0).astype(jnp.int32)
  # Rows without a condition (cond length 0, Omni's TTS rows) and frames past a row's length: zero input.
  keep = jnp.arange(length)[None, :] < frames[:, None]
  return jnp.where(keep[..., None], feat, 0.0)


def condition_rows(setup: FinetuneSetup, batch: Batch) -> Optional[jax.Array]:
  """`[batch]` bool, True on rows with a frame-level condition (Omni); None when every row has one.

  An Omni batch mixes conditioned rows (SE/TSE/VC, by the batch's `task` index
  in `data.tasks.TASKS`) with TTS rows, which have none: on those the adapter
  must add exactly 0 (not its biases applied to zero features), as it does
  when TTS is decoded (`inference.decoding.without_adapter`).
  """
  if setup.task != "omni" or not setup.model.config.cond_feature_dim:
    return None
  from metis_jax.data import tasks  # pylint: disable=import-outside-toplevel
  ids = jnp.asarray([tasks.TASKS.index(t) for t in (*AUDIO_TASKS, "l2s")], jnp.int32)
  return (batch["task"].astype(jnp.int32)[:, None] == ids[None, :]).any(-1)


def loss_rows(setup: FinetuneSetup, encoder: Any, batch: Batch, corruption: masking.TrainingMask,
              seq_valid: jax.Array, dropped: jax.Array) -> dict[str, Any]:
  """The model inputs of `finetune_loss` for a task batch and its corruption (`sample_finetune_mask`).

  Returns tokens int32 `[B, T]`, valid `[B, T]` (= seq_valid), corruption, and
  as the model needs them features `[B, T, cond_feature_dim]`, condition_rows
  bool `[B]` (Omni only), phones int32 / phone_valid bool `[B, P]` (dropped
  rows' phones invalid).
  """
  rows = {"tokens": batch["tokens"].astype(jnp.int32), "valid": seq_valid, "corruption": corruption}
  features = condition_features(setup, encoder, batch)
  if features is not None:
    rows["features"] = features
    cond_rows = condition_rows(setup, batch)
    if cond_rows is not None:
      rows["condition_rows"] = cond_rows
  if setup.model.config.use_phone_cond:
    rows["phones"] = batch["phones"].astype(jnp.int32)
    rows["phone_valid"] = batch["phone_valid"].astype(bool) & ~dropped[:, None]
  return rows


def finetune_loss(model: metis.MetisModel, params: Any, rows: dict[str, Any], rngs: Any = None,
                  chunk_size: int = masking.DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked CE over the corrupted target tokens, from the hidden states (`metis.training_loss`).

  Args:
    model: the fine-tuned model.
    params: its full parameters (trained + frozen).
    rows: tokens int32 `[b, T]`, valid bool `[b, T]` (dropped prompts already
      padding), corruption (a `masking.TrainingMask` of `[b]` / `[b, T]`
      leaves), and optionally features `[b, T, cond_feature_dim]`,
      condition_rows bool `[b]`, phones int32 / phone_valid bool `[b, P]`.
    rngs: flax RNGs (LoRA dropout).
    chunk_size: positions per row per logits chunk.

  Returns:
    (mean CE, accuracy, scored tokens), float32 scalars; no `[b, T, vocab]`
    logits are materialized.
  """
  extra = {k: rows[k] for k in ("features", "condition_rows", "phones", "phone_valid") if k in rows}
  return metis.training_loss(params, model, rows["tokens"], rows["valid"], rows["corruption"], rngs=rngs,
                             chunk_size=chunk_size, **extra)


# ----------------------------------------------------------------------------- the step


def finetune_step(state: FinetuneState, batch: Batch, frozen: dict, encoder: Any, *, setup: FinetuneSetup,
                  config: ml_collections.ConfigDict) -> tuple[FinetuneState, dict[str, jax.Array]]:
  """One optimizer step of the trainable subset on a global task batch.

  Args:
    state: the fine-tune state (trainable parameters and their optimizer).
    batch: a task batch (`data.tasks` module doc): tokens/valid `[B, T]`,
      prompt_lengths `[B]`, and the task's condition keys.
    frozen: the frozen half of the parameters (not donated, never updated).
    encoder: the frozen w2v-BERT `codec_state.FrozenEncoder`, or None.

  Returns:
    (state with step + 1, float32 scalar metrics as `step.train_step`'s, plus `prompt_dropped`).
  """
  cfg = config.train
  num_micro = int(cfg.grad_accum_steps)
  rng = update_lib.step_key(state.rng, state.step)
  k_mask, k_drop = jax.random.split(rng)
  valid = batch["valid"].astype(bool)
  corruption, seq_valid, dropped = sample_finetune_mask(k_mask, valid, batch["prompt_lengths"], setup.masking,
                                                        setup.prompt_drop_prob)
  rows = loss_rows(setup, encoder, batch, corruption, seq_valid, dropped)
  micro = jax.tree.map(lambda x: step_lib.split_microbatches(x, num_micro), rows)
  dropout_keys = jax.random.key_data(jax.random.split(k_drop, num_micro))
  batch_axes = mesh_lib.BATCH_AXES
  model = setup.model

  def loss_fn(trainable, mb):
    rows_mb, key_data = mb
    rows_mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))), rows_mb)
    params = graft(trainable, frozen)
    mean_ce, accuracy, count = finetune_loss(model, params, rows_mb,
                                             rngs={"dropout": jax.random.wrap_key_data(key_data)})
    return mean_ce * count, (accuracy * count, count)

  # value_and_grad in the first argument (the trainable tree) only.
  sums = step_lib.accumulate_gradients(loss_fn, state.params, (micro, dropout_keys), num_micro)
  new_state, metrics = step_lib.apply_token_mean_update(state, setup.optimizer, cfg, sums)
  metrics = dict(metrics, valid_tokens=valid.sum().astype(jnp.float32),
                 prompt_dropped=dropped.sum().astype(jnp.float32))
  return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def batch_spec(config: ml_collections.ConfigDict, features_in_batch: Optional[bool] = None,
               batch: int = 0, length: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global task batch (`data.tasks` module doc).

  `features_in_batch`: audio conditions as `cond_features [B, T, cond_feature_dim]`
  (default: with `model.cond_feature='cheap'`) instead of `cond_audio [B, 320 T + 80]`.
  """
  f, m = config.finetune, config.model
  b, t = batch or config.train.global_batch_size, length or config.train.seq_length
  spec = {"tokens": jax.ShapeDtypeStruct((b, t), np.int32), "valid": jax.ShapeDtypeStruct((b, t), np.bool_),
          "prompt_lengths": jax.ShapeDtypeStruct((b,), np.int32), "task": jax.ShapeDtypeStruct((b,), np.int32)}
  tasks = tuple(f.omni_tasks) if f.task == "omni" else (f.task,)
  if features_in_batch is None:
    features_in_batch = m.cond_feature == "cheap"
  if any(x in AUDIO_TASKS for x in tasks):
    if features_in_batch:
      spec["cond_features"] = jax.ShapeDtypeStruct((b, t, m.cond_feature_dim), np.float32)
      spec["cond_lengths"] = jax.ShapeDtypeStruct((b,), np.int32)
    else:
      spec["cond_audio"] = jax.ShapeDtypeStruct((b, 320 * t + 80), np.float32)
      spec["cond_audio_lengths"] = jax.ShapeDtypeStruct((b,), np.int32)
  if "l2s" in tasks:
    spec["visual"] = jax.ShapeDtypeStruct((b, t, VISUAL_DIM), np.float32)
  if "tts" in tasks:
    spec["phones"] = jax.ShapeDtypeStruct((b, int(f.phone_length)), np.int32)
    spec["phone_valid"] = jax.ShapeDtypeStruct((b, int(f.phone_length)), np.bool_)
  return spec


def jit_finetune_step(setup: FinetuneSetup, config: ml_collections.ConfigDict, mesh: Mesh,
                      spec: dict[str, Any], encoder_shardings: Any = None):
  """Compiles `(state, batch, frozen, encoder) -> (state, metrics)`; the state (only) is donated."""
  pure = functools.partial(finetune_step, setup=setup, config=config)

  def step(state, batch, frozen, encoder):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(setup.rules):
      return pure(state, batch, frozen, encoder)

  shardings = state_shardings(setup, mesh)
  return jax.jit(step, in_shardings=(shardings, step_lib.batch_shardings(mesh, spec),
                                     frozen_shardings(setup, mesh), encoder_shardings),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


# ----------------------------------------------------------------------------- data


class _TaskBatches:
  """Host task batches with a fixed phone width (one compiled step) and the loop's `skipped_files`."""

  def __init__(self, local, phone_length: int, phone_pad_id: int):
    self.local, self.phone_length, self.phone_pad_id = local, phone_length, phone_pad_id

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self.local))
    if "phones" in batch:
      p = batch["phones"].shape[1]
      if p > self.phone_length:
        raise FinetuneError(f"a task batch has {p} phones > finetune.phone_length={self.phone_length}; "
                            "raise it")
      pad = ((0, 0), (0, self.phone_length - p))
      batch["phones"] = np.pad(batch["phones"], pad, constant_values=self.phone_pad_id)
      batch["phone_valid"] = np.pad(batch["phone_valid"], pad)
    return batch

  @property
  def skipped_files(self) -> int:
    return int(getattr(self.local, "skipped", 0))

  def get_state(self):
    return self.local.get_state()

  def set_state(self, state) -> None:
    self.local.set_state(state)

  def close(self) -> None:
    if hasattr(self.local, "close"):
      self.local.close()


def task_options(config: ml_collections.ConfigDict, **overrides):
  """`data.tasks.TaskOptions` of a fine-tune config."""
  from metis_jax.data import tasks  # pylint: disable=import-outside-toplevel
  f = config.finetune
  values = dict(max_length=int(config.train.seq_length), min_tokens=int(f.min_tokens),
                prompt_tokens=tuple(f.prompt_tokens), snr_db=tuple(f.snr_db), reverb_prob=float(f.reverb_prob),
                sir_db=tuple(f.sir_db), vc_semitones=tuple(f.vc_semitones), vc_formant=float(f.vc_formant),
                features="cheap" if config.model.cond_feature == "cheap" else "audio",
                visual_suffix=f.visual_suffix, visual_dir=f.visual_dir, phone_pad_id=int(config.model.phone_pad_id),
                omni_tasks=tuple(f.omni_tasks), omni_weights=tuple(f.omni_weights))
  values.update(overrides)
  try:
    return tasks.TaskOptions(**values)
  except ValueError as e:
    raise FinetuneError(f"config.finetune: {e}") from e


def make_task_batches(config: ml_collections.ConfigDict, batch_size: int, *, heldout: bool = False,
                      process_index: int = 0, process_count: int = 1, seed: Optional[int] = None,
                      num_epochs: int = 0):
  """This host's task batches of a fine-tune config (train split, or the demo's held-out targets)."""
  from metis_jax.data import demo, tasks  # pylint: disable=import-outside-toplevel
  f = config.finetune
  if not config.data.train_sources:
    raise FinetuneError("no task data: set config.data.train_sources (shards tokenized with --record_sources) "
                        "or data.demo_corpus=True")
  target_filter = pool_filter = None
  if f.demo_heldout:
    target_filter = demo.is_heldout if heldout else (lambda i: not demo.is_heldout(i))
    pool_filter = (lambda i: True) if heldout else None
  local = tasks.make_task_iterator(
      f.task, config.data.train_sources[0], task_options(config), batch_size=batch_size,
      seed=config.seed if seed is None else seed, num_epochs=num_epochs, process_index=process_index,
      process_count=process_count, num_workers=int(config.data.num_workers),
      buckets=(int(config.train.seq_length),), audio_root=f.audio_root, noise_dirs=tuple(f.noise_dirs),
      rir_dirs=tuple(f.rir_dirs), target_filter=target_filter, pool_filter=pool_filter)
  return _TaskBatches(local, int(f.phone_length), int(config.model.phone_pad_id))


# ----------------------------------------------------------------------------- the objective


@dataclasses.dataclass(frozen=True)
class _Steps:
  step_fn: Any
  frozen: dict
  encoder: Any

  def start(self, state: FinetuneState, batch) -> FinetuneState:
    del batch
    return state

  def __call__(self, state: FinetuneState, batch):
    return self.step_fn(state, batch, self.frozen, self.encoder)

  def compile_ahead(self, state: FinetuneState, specs) -> tuple["_Steps", compile_ahead_lib.AheadCompiled]:
    """These steps with the step compiled for every batch spec (`compile_ahead.compile_ahead`)."""
    ahead = compile_ahead_lib.compile_ahead(self.step_fn, state, specs, self.frozen, self.encoder)
    return dataclasses.replace(self, step_fn=ahead), ahead


def _has_checkpoints(workdir: str) -> bool:
  root = os.path.join(workdir, "checkpoints")
  return "://" not in workdir and os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root))


class FinetuneObjective:
  """`model.kind = 'metis_finetune'`, for `training/loop.py` (module doc)."""

  def __init__(self, config: ml_collections.ConfigDict):
    if not config.finetune.base:
      raise FinetuneError("finetune.base is empty: give the base model (--config.finetune.base=PATH: a training "
                          "workdir, a converted folder or a released .safetensors file)")
    self.config = config
    self.setup = make_setup(config)
    self.mask = trainable_mask(self.setup)
    self._base: Optional[finetune_base.Base] = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "FinetuneObjective":
    return cls(config)

  kind = KIND

  @property
  def base(self) -> finetune_base.Base:
    """The frozen base (loaded once, on first use)."""
    if self._base is None:
      self._base = finetune_base.load_base(self.config.finetune.base, self.config.model)
      logging.info("fine-tune base %s (%s), sha256 %s", self._base.path, self._base.description,
                   self._base.sha256)
    return self._base

  def prepare(self, config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    record = finetune_base.read_record(workdir)
    if record and _has_checkpoints(workdir):
      finetune_base.check_same_base(record["sha256"], record["path"], self.base,
                                    os.path.join(workdir, "checkpoints"))
    finetune_base.write_record(workdir, self.base)
    if config.data.train_sources or not config.data.demo_corpus:
      return config
    from metis_jax.data import demo  # pylint: disable=import-outside-toplevel
    base_demo = os.path.join(self.base.path, "demo_data")
    directory = base_demo if os.path.isdir(base_demo) else os.path.join(workdir, "demo_data")
    out = demo.prepare_tasks(directory, config.data, log=logging.info)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.train_sources = (out["shards"],)
      config.finetune.noise_dirs = (out["noise"],)
      config.finetune.rir_dirs = (out["rir"],)
      config.finetune.visual_dir = out["visual"]
      config.finetune.demo_heldout = True
    return config

  def state_shardings(self, mesh: Mesh) -> FinetuneState:
    return state_shardings(self.setup, mesh)

  def abstract_state(self, mesh: Mesh) -> FinetuneState:
    return abstract_state(self.setup, mesh)

  def _check_base_leaves(self) -> None:
    shapes = param_shapes(self.setup)
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
      keys = _keys(path)
      value = _lookup(self.base.params, keys)
      frozen = not _lookup(self.mask, keys)
      if value is None and frozen:
        raise FinetuneError(
            f"finetune.base {self.base.path} has no parameter {'/'.join(keys)}, which "
            f"finetune.trainable={self.setup.trainable!r} keeps frozen: train it (e.g. add '+phones') or use a "
            "base that has it")
      if value is not None and tuple(value.shape) != tuple(leaf.shape):
        raise FinetuneError(f"finetune.base {self.base.path}: {'/'.join(keys)} has shape {tuple(value.shape)}, "
                            f"the configured model {tuple(leaf.shape)}")

  def create_state(self, mesh: Mesh, seed: int) -> FinetuneState:
    """A fresh state: new leaves (LoRA: B = 0; gated adapter: gate 0) initialized, base leaves copied."""
    self._check_base_leaves()
    shardings = self.state_shardings(mesh)
    state = jax.jit(init_fn(self.setup, seed), out_shardings=shardings)()

    def from_base(path, leaf, sharding):
      value = _lookup(self.base.params, _keys(path))
      return leaf if value is None else jax.device_put(np.asarray(value, leaf.dtype), sharding)

    params = jax.tree_util.tree_map_with_path(from_base, state.params, shardings.params)
    words = jax.device_put(finetune_base.hash_words(self.base.sha256), shardings.base_hash)
    return state.replace(params=params, base_hash=words)

  def frozen_params(self, mesh: Mesh) -> dict:
    """The frozen half, on `mesh` with its shardings."""
    self._check_base_leaves()
    shardings = frozen_shardings(self.setup, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, sh: jax.device_put(np.asarray(_lookup(self.base.params, _keys(path)), np.float32), sh),
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))

  def batch_spec(self):
    return batch_spec(self.config)

  def data_iterator(self, config: ml_collections.ConfigDict, mesh: Mesh, process_index: Optional[int] = None,
                    process_count: Optional[int] = None):
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    global_batch = config.train.global_batch_size
    local = make_task_batches(config, input_pipeline.local_batch_size(global_batch, mesh, count),
                              process_index=index, process_count=count)
    return input_pipeline.GlobalBatchIterator(local, mesh, global_batch)

  def compile(self, config: ml_collections.ConfigDict, mesh: Mesh) -> _Steps:
    encoder = encoder_sh = None
    if self.setup.encoder is not None:
      from metis_jax.training import codec_state  # pylint: disable=import-outside-toplevel
      enc_setup = _EncoderSetup(self.setup.encoder, self.setup.rules)
      encoder = codec_state.create_encoder(enc_setup, config, mesh)
      encoder_sh = codec_state.encoder_shardings(self.setup.encoder, mesh, self.setup.rules)
    step_fn = jit_finetune_step(self.setup, config, mesh, self.batch_spec(), encoder_sh)
    return _Steps(step_fn, self.frozen_params(mesh), encoder)

  def progress(self, config: ml_collections.ConfigDict) -> objective_lib.Progress:
    t = config.train
    return objective_lib.Progress(
        unit="tokens", units_per_step=t.global_batch_size * t.seq_length, line=metrics_lib.progress_line,
        flops_per_unit=metrics_lib.training_flops_per_token(config.model, t.seq_length))

  def report(self) -> str:
    """`trainable.report` of the fine-tuned model: parameters per group, trained or frozen."""
    return trainable_lib.report(param_shapes(self.setup), self.mask)

  def describe(self, state: FinetuneState, config: ml_collections.ConfigDict) -> str:
    """Checks the state's base hash (a resumed run) and prints the trainable-parameter report."""
    saved = finetune_base.words_hex(jax.device_get(state.base_hash))
    finetune_base.check_same_base(saved, "", self.base, "the restored checkpoint")
    table = self.report()
    if jax.process_index() == 0:
      print(f"fine-tune {self.setup.task} ({self.setup.trainable}) from {self.base.path}:\n{table}", flush=True)
    t = config.train
    return (f"model.kind {KIND!r}, task {self.setup.task!r}, trainable {self.setup.trainable!r}: "
            f"{metis.count_params(state.params) / 1e6:.2f}M trained of "
            f"{metis.count_params(param_shapes(self.setup)) / 1e6:.1f}M; base {self.base.path} "
            f"({self.base.description}); global batch {t.global_batch_size} x {t.seq_length} tokens")

  def full_params(self, state: FinetuneState) -> dict:
    """Trained + frozen parameters as numpy (unmerged LoRA)."""
    trained = jax.tree.map(np.asarray, jax.device_get(state.params))
    frozen = select(self.base.params, _restrict(self.mask, self.base.params), False)
    return graft(trained, frozen)

  def export(self, state: FinetuneState, workdir: str) -> list[str]:
    if not self.config.finetune.export:
      return []
    from metis_jax.training import finetune_export  # pylint: disable=import-outside-toplevel
    params = self.full_params(state)
    if jax.process_index() != 0 or "://" in workdir:
      return []
    base_trained = trainable_lib.group_counts(param_shapes(self.setup), self.mask).get("base", 0) > 0
    return finetune_export.export(params, self.config.model, os.path.join(workdir, "export"), full=base_trained)


def _restrict(mask: Any, tree: Any) -> Any:
  """`mask` over the keys of `tree` (base leaves the model lacks count as trainable, i.e. dropped)."""
  if isinstance(tree, dict):
    return {k: _restrict(mask.get(k, True) if isinstance(mask, dict) else True, v) for k, v in tree.items()}
  return mask if isinstance(mask, bool) else True
