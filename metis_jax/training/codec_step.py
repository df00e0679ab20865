"""The codecs' pure training steps and their jitted, sharded forms (the codecs' `train_step`).

Semantic codec (RepCodec): loss = l1_weight * L1 + mse_weight * MSE of the
reconstruction to the input features (our decision: L1 keeps outliers in
check, MSE matches the usual RepCodec objective) + commitment (0.15) +
codebook (1.0) VQ losses. The input features are normalized w2v-BERT
features computed inside the step from 16 kHz crops with the frozen encoder
(`codec_train_state.FrozenEncoder`), or synthetic frames.

Acoustic codec (GAN): generator loss = mel_weight * multi-scale log-mel L1 +
adv_weight * LSGAN + feature_matching_weight * feature matching (multi-period
and multi-resolution spectrogram discriminators) + vq_weight * (commitment
0.25 + codebook 1.0), with quantizer dropout; discriminator loss = LSGAN.
`generator_step` and `discriminator_step` are separate pure functions; the
discriminator step takes the generator's output of the same batch.

Both: with `codebook_init = 'data'`, the first step's batch first sets every
RVQ codebook to random projected latents of that batch, layer by layer
(`init_codebooks`). The acoustic codec needs it: its encoder starts with
latents about 300 times smaller than N(0, 1) codebook rows, the commitment
loss then pulls every latent outward, the easiest way out is one shared
direction, and the cosine search then uses 1-2 codes per layer (a tiny CPU run
collapsed that way within 100 steps at every learning rate, while the same
encoder and decoder without the quantizer learned to reconstruct). Every
`restart_every` steps, codes used fewer than `restart_threshold` times since
the last restart are re-drawn from random projected latents z_e of the
current batch (dead-code restarts). An update whose loss or gradient
norm is NaN/Inf is skipped (parameters and optimizer state kept, counted per
network). The step's random numbers come from
`fold_in(key(state.rng), state.step)`.

Batches: audio `{'wav': float32 [B, N], 'lengths': int32 [B]}` (zero after
each length), or synthetic features `{'features': float32 [B, T, H]}`.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from metis_jax.models import acoustic_codec as ac
from metis_jax.training import codec_losses
from metis_jax.nn import spectral
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import optimizer as optimizer_lib
from metis_jax.training import update as update_lib
from metis_jax.models import semantic_codec as sc
from metis_jax.frontend import ssl_features
from metis_jax.training.codec_state import DISCRIMINATOR, GENERATOR, CodecSetup, CodecTrainState
from metis_jax.nn import quantizer as vq

Batch = dict[str, jax.Array]


def step_key(state: CodecTrainState) -> jax.Array:
  """The PRNG key of the step about to run."""
  return update_lib.step_key(state.rng, state.step)


def restart_codebooks(quantizer: dict, usage: jax.Array, z_e: jax.Array, valid: Optional[jax.Array],
                      key: jax.Array, threshold: float) -> tuple[dict, jax.Array]:
  """Dead-code restarts of every layer of a ResidualVQ's parameters.

  Args:
    quantizer: ResidualVQ params {'layers_q': {'codebook': [K, d], ...}}.
    usage: `[n_q, K]` code counts since the last restart.
    z_e: `[n_q, batch, time, d]` projected latents of this batch (candidates).
    valid: `[batch, time]` bool; candidates are drawn from valid frames only.
    key: PRNG key.
    threshold: codes used fewer times are re-drawn.

  Returns:
    (new quantizer params, number of codes restarted).
  """
  n_q, d = z_e.shape[0], z_e.shape[-1]
  weights = None if valid is None else valid.reshape(-1).astype(jnp.float32)
  layers = dict(quantizer)
  total = jnp.zeros((), jnp.int32)
  for q in range(n_q):
    k_pick, k_restart, key = jax.random.split(key, 3)
    cand = jax.lax.stop_gradient(z_e[q].reshape(-1, d))
    if weights is not None:
      p = weights / jnp.maximum(jnp.sum(weights), 1.0)
      cand = cand[jax.random.choice(k_pick, cand.shape[0], (cand.shape[0],), p=p)]
    layer = dict(layers[f"layers_{q}"])
    layer["codebook"], n = vq.restart_dead_codes(layer["codebook"], usage[q], cand, k_restart, threshold)
    layers[f"layers_{q}"] = layer
    total = total + n.astype(jnp.int32)
  return layers, total


def _quantizer_path(kind: str) -> tuple[str, ...]:
  return ("decoder", "quantizer") if kind == ac.KIND else ("quantizer",)


def _get_quantizer(params: dict, kind: str) -> dict:
  for p in _quantizer_path(kind):
    params = params[p]
  return params


def _put_quantizer(params: dict, kind: str, quantizer: dict) -> dict:
  """`params` with the ResidualVQ subtree replaced (the other subtrees shared, not copied)."""

  def put(tree, path):
    return quantizer if not path else dict(tree, **{path[0]: put(tree[path[0]], path[1:])})

  return put(params, _quantizer_path(kind))



def maybe_restart(params: dict, usage: jax.Array, codes: jax.Array, z_e: jax.Array, valid: jax.Array,
                  key: jax.Array, step: jax.Array, applied: jax.Array, kind: str,
                  train: ml_collections.ConfigDict, codebook_size: int):
  """Adds this batch's codes to `usage`; every `restart_every` steps restarts the dead codes.

  Nothing changes on a skipped step (`applied` False).

  Returns:
    (params, usage, batch usage `[n_q, K]`, number of codes restarted).
  """
  batch_usage = vq.codebook_usage(codes, codebook_size, valid)
  new_usage = jnp.where(applied, usage + batch_usage, usage)
  if not train.restart_every:
    return params, new_usage, batch_usage, jnp.zeros((), jnp.int32)
  do = applied & ((step + 1) % train.restart_every == 0)
  node = _get_quantizer(params, kind)
  fresh, n = restart_codebooks(node, new_usage, z_e, valid, key, train.restart_threshold)
  chosen = jax.tree.map(lambda f, o: jnp.where(do, f, o), fresh, node)
  params = _put_quantizer(params, kind, chosen)
  return params, jnp.where(do, 0.0, new_usage), batch_usage, jnp.where(do, n, 0).astype(jnp.int32)


def init_codebooks(state: CodecTrainState, batch: Batch, encoder: Any = None, *,
                   setup: CodecSetup) -> CodecTrainState:
  """Every RVQ codebook drawn from this batch's projected latents (`ResidualVQ.data_codebooks`).

  Run once, on the first batch of a fresh run, before its first step. Only
  the codebooks change (the optimizer moments of a fresh run are zero). The
  draws come from `fold_in(key(state.rng), 2**32 - 1)`, apart from every step's key.
  """
  params = state.params[GENERATOR]
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), jnp.uint32(2**32 - 1))
  if setup.kind == ac.KIND:
    latent_fn = lambda m: m.encode_latent(batch["wav"], batch["lengths"])
    rvq = lambda m: m.decoder.quantizer
  else:
    feat, valid = input_features(setup, encoder, batch)
    latent_fn = lambda m: (m.encoder(feat, valid), valid)
    rvq = lambda m: m.quantizer
  latent, valid = setup.codec.apply({"params": params}, method=latent_fn)
  books = setup.codec.apply({"params": params}, latent, valid, key,
                            method=lambda m, *a: rvq(m).data_codebooks(*a))
  quantizer = dict(_get_quantizer(params, setup.kind))
  for q in range(books.shape[0]):
    quantizer[f"layers_{q}"] = dict(quantizer[f"layers_{q}"], codebook=books[q].astype(
        quantizer[f"layers_{q}"]["codebook"].dtype))
  return state.replace(params=dict(state.params, **{GENERATOR: _put_quantizer(params, setup.kind, quantizer)}))


def _usage_metrics(batch_usage: jax.Array) -> dict[str, jax.Array]:
  return dict(perplexity=jnp.mean(vq.perplexity(batch_usage)),
              codes_used=jnp.mean(jnp.sum(batch_usage > 0, axis=-1).astype(jnp.float32)))


def _finish(metrics: dict) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- semantic codec


def input_features(setup: CodecSetup, encoder: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """The semantic codec's input: (features `[B, T, H]` float32, valid `[B, T]` bool).

  From audio: normalized w2v-BERT features of the 16 kHz crops (frozen
  encoder, no gradient); synthetic batches carry their features.
  """
  if "features" in batch:
    feat = batch["features"].astype(jnp.float32)
    return feat, jnp.ones(feat.shape[:2], bool)
  feat, lengths = ssl_features.features(setup.encoder, encoder.params, encoder.mean, encoder.var,
                                        batch["wav"], batch["lengths"])
  return feat, jnp.arange(feat.shape[1])[None, :] < lengths[:, None]


def semantic_step(state: CodecTrainState, batch: Batch, encoder: Any, *, setup: CodecSetup,
                  config: ml_collections.ConfigDict) -> tuple[CodecTrainState, dict[str, jax.Array]]:
  """One update of the semantic codec.

  Returns:
    (state, metrics): float32 scalars loss, reconstruction, commit, codebook,
    grad_norm, learning_rate, skipped, skipped_steps, perplexity and
    codes_used (of this batch), restarted.
  """
  t, c = config.train, setup.codec_config
  feat, valid = input_features(setup, encoder, batch)
  params = state.params[GENERATOR]

  def loss_fn(p):
    out = setup.codec.apply({"params": p}, feat, valid)
    rec = sc.reconstruction_loss(out.reconstruction, feat, valid, t.l1_weight, t.mse_weight)
    return rec + out.commit_loss + out.codebook_loss, (rec, out)

  (loss, (rec, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  new_params, opt_state, grad_norm, skipped = update_lib.guarded_update(
      setup.optimizers[GENERATOR], grads, state.opt_state[GENERATOR], params, loss, t.skip_nonfinite,
      state.step + 1 == t.inject_nan_at_step)
  new_params, usage, batch_usage, restarted = maybe_restart(
      new_params, state.usage, out.codes, out.vq.z_e, valid, step_key(state), state.step, ~skipped, setup.kind,
      t, c.codebook_size)
  skipped_steps = state.skipped_steps[GENERATOR] + skipped.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params={GENERATOR: new_params},
                            opt_state={GENERATOR: opt_state}, skipped_steps={GENERATOR: skipped_steps},
                            usage=usage)
  lr = optimizer_lib.learning_rate_schedule(t)(state.step - state.skipped_steps[GENERATOR])
  metrics = dict(loss=loss, reconstruction=rec, commit=out.commit_loss, codebook=out.codebook_loss,
                 grad_norm=grad_norm, learning_rate=lr, skipped=skipped, skipped_steps=skipped_steps,
                 restarted=restarted, **_usage_metrics(batch_usage))
  return new_state, _finish(metrics)


# ----------------------------------------------------------------------------- acoustic codec


def _real(batch: Batch, samples: int, hop: int) -> jax.Array:
  """The target waveform `[B, samples]`: the crop cut to whole frames, zero after each length."""
  lengths = jnp.minimum(batch["lengths"], samples) // hop * hop
  wav = batch["wav"][:, :samples].astype(jnp.float32)
  return jnp.where(jnp.arange(samples)[None, :] < lengths[:, None], wav, 0.0)


def generator_step(state: CodecTrainState, batch: Batch, *, setup: CodecSetup,
                   config: ml_collections.ConfigDict) -> tuple[CodecTrainState, dict[str, jax.Array], jax.Array]:
  """One generator update on an audio batch.

  Returns:
    (state with step + 1, metrics, generated waveform `[B, frames * hop]`).
    Metrics: loss, mel, adv, feature_matching, commit, codebook, grad_norm,
    learning_rate, skipped, skipped_steps, perplexity, codes_used, restarted.
  """
  t, c = config.train, setup.codec_config
  key = step_key(state)
  drop_key, restart_key = jax.random.split(key)
  params, disc_params = state.params[GENERATOR], state.params[DISCRIMINATOR]
  gan_on = (state.step >= t.disc_start_step).astype(jnp.float32)

  def loss_fn(p):
    out = setup.codec.apply({"params": p}, batch["wav"], batch["lengths"], train=True,
                            rngs={"dropout": drop_key})
    fake = out.wav
    real = _real(batch, fake.shape[1], c.hop_size)
    mel = spectral.multiscale_mel_loss(fake, real, c.sample_rate, tuple(t.mel_windows), tuple(t.mel_bins))
    _, real_feats = setup.disc.apply({"params": disc_params}, real)
    fake_logits, fake_feats = setup.disc.apply({"params": disc_params}, fake)
    adv = codec_losses.lsgan_generator_loss(fake_logits)
    fm = codec_losses.feature_matching_loss(real_feats, fake_feats)
    total = (t.mel_weight * mel + gan_on * (t.adv_weight * adv + t.feature_matching_weight * fm)
             + t.vq_weight * (out.commit_loss + out.codebook_loss))
    return total, (dict(mel=mel, adv=adv, feature_matching=fm, commit=out.commit_loss,
                        codebook=out.codebook_loss), out)

  (loss, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  new_params, opt_state, grad_norm, skipped = update_lib.guarded_update(
      setup.optimizers[GENERATOR], grads, state.opt_state[GENERATOR], params, loss, t.skip_nonfinite,
      state.step + 1 == t.inject_nan_at_step)
  new_params, usage, batch_usage, restarted = maybe_restart(
      new_params, state.usage, out.codes, out.z_e, out.frame_valid, restart_key, state.step, ~skipped,
      setup.kind, t, c.codebook_size)
  skipped_steps = dict(state.skipped_steps)
  skipped_steps[GENERATOR] = skipped_steps[GENERATOR] + skipped.astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=dict(state.params, **{GENERATOR: new_params}),
                            opt_state=dict(state.opt_state, **{GENERATOR: opt_state}),
                            skipped_steps=skipped_steps, usage=usage)
  lr = optimizer_lib.learning_rate_schedule(t)(state.step - state.skipped_steps[GENERATOR])
  metrics = dict(loss=loss, **terms, grad_norm=grad_norm, learning_rate=lr, skipped=skipped,
                 skipped_steps=skipped_steps[GENERATOR], restarted=restarted, **_usage_metrics(batch_usage))
  return new_state, _finish(metrics), jax.lax.stop_gradient(out.wav)


def discriminator_step(state: CodecTrainState, batch: Batch, fake: jax.Array, *, setup: CodecSetup,
                       config: ml_collections.ConfigDict) -> tuple[CodecTrainState, dict[str, jax.Array]]:
  """One discriminator update on the real crops and the generator's `fake` `[B, frames * hop]`.

  Returns:
    (state, metrics disc_loss, disc_grad_norm, disc_skipped, disc_skipped_steps).
  """
  t = config.train
  real = _real(batch, fake.shape[1], setup.codec_config.hop_size)
  fake = jax.lax.stop_gradient(fake)
  params = state.params[DISCRIMINATOR]

  def loss_fn(p):
    real_logits, _ = setup.disc.apply({"params": p}, real)
    fake_logits, _ = setup.disc.apply({"params": p}, fake)
    return codec_losses.lsgan_discriminator_loss(real_logits, fake_logits)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  new_params, opt_state, grad_norm, skipped = update_lib.guarded_update(
      setup.optimizers[DISCRIMINATOR], grads, state.opt_state[DISCRIMINATOR], params, loss,
      t.skip_nonfinite)
  skipped_steps = dict(state.skipped_steps)
  skipped_steps[DISCRIMINATOR] = skipped_steps[DISCRIMINATOR] + skipped.astype(jnp.int32)
  new_state = state.replace(params=dict(state.params, **{DISCRIMINATOR: new_params}),
                            opt_state=dict(state.opt_state, **{DISCRIMINATOR: opt_state}),
                            skipped_steps=skipped_steps)
  metrics = dict(disc_loss=loss, disc_grad_norm=grad_norm, disc_skipped=skipped,
                 disc_skipped_steps=skipped_steps[DISCRIMINATOR])
  return new_state, _finish(metrics)


# ----------------------------------------------------------------------------- jitted, sharded


def batch_spec(setup: CodecSetup, config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch."""
  b = config.train.global_batch_size
  if setup.from_audio:
    return {"wav": jax.ShapeDtypeStruct((b, setup.crop), jnp.float32),
            "lengths": jax.ShapeDtypeStruct((b,), jnp.int32)}
  return {"features": jax.ShapeDtypeStruct((b, setup.crop, setup.codec_config.hidden_size), jnp.float32)}


def batch_shardings(mesh: Mesh, spec: dict[str, Any]) -> dict[str, Any]:
  """Every batch array split over data x fsdp along its first axis."""
  return {k: mesh_lib.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}


@dataclasses.dataclass(frozen=True)
class JittedSteps:
  """The compiled steps of one run.

  generator: acoustic `(state, batch) -> (state, metrics, fake)`;
    semantic `(state, batch, encoder) -> (state, metrics)`.
  discriminator: acoustic `(state, batch, fake) -> (state, metrics)`, else None.
  codebooks: `(state, batch, encoder) -> state` (`init_codebooks`).
  """
  kind: str
  generator: Callable
  discriminator: Optional[Callable]
  codebooks: Callable

  def init_codebooks(self, state: CodecTrainState, batch: Batch, encoder: Any = None) -> CodecTrainState:
    """The state with every codebook drawn from `batch` (a fresh run's first batch)."""
    return self.codebooks(state, batch, encoder)

  def __call__(self, state: CodecTrainState, batch: Batch, encoder: Any = None):
    """One full training step -> (state, merged metrics)."""
    if self.discriminator is None:
      return self.generator(state, batch, encoder)
    state, metrics, fake = self.generator(state, batch)
    state, d_metrics = self.discriminator(state, batch, fake)
    return state, {**metrics, **d_metrics}


def jit_steps(setup: CodecSetup, config: ml_collections.ConfigDict, mesh: Mesh, shardings: CodecTrainState,
              encoder_shardings: Any = None) -> JittedSteps:
  """Compiles the steps for `mesh`: explicit in/out shardings, the state donated.

  Args:
    setup: from `codec_train_state.make_setup`.
    config: the run config.
    mesh: device mesh.
    shardings: CodecTrainState of NamedShardings.
    encoder_shardings: FrozenEncoder of NamedShardings (semantic codec from audio).
  """
  spec = batch_spec(setup, config)
  batch_sh = batch_shardings(mesh, spec)
  replicated = mesh_lib.replicated(mesh)

  def in_context(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(setup.rules):
        return fn(*args)
    return wrapped

  books = jax.jit(in_context(functools.partial(init_codebooks, setup=setup)),
                  in_shardings=(shardings, batch_sh, encoder_shardings), out_shardings=shardings,
                  donate_argnums=0)
  if setup.kind == ac.KIND:
    fake_sh = mesh_lib.batch_sharding(mesh, 2)
    gen = in_context(functools.partial(generator_step, setup=setup, config=config))
    disc = in_context(functools.partial(discriminator_step, setup=setup, config=config))
    return JittedSteps(
        setup.kind,
        jax.jit(gen, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated, fake_sh),
                donate_argnums=0),
        jax.jit(disc, in_shardings=(shardings, batch_sh, fake_sh), out_shardings=(shardings, replicated),
                donate_argnums=0),
        books)
  step = in_context(functools.partial(semantic_step, setup=setup, config=config))
  return JittedSteps(setup.kind, jax.jit(step, in_shardings=(shardings, batch_sh, encoder_shardings),
                                         out_shardings=(shardings, replicated), donate_argnums=0), None,
                     books)
