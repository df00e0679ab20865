r"""Training the codecs (the original trainers are not released): pure jitted steps and a small CLI.

Semantic codec (RepCodec): loss = l1_weight * L1 + mse_weight * MSE of the
reconstruction to the input features (our decision: L1 keeps outliers in
check, MSE matches the usual RepCodec objective) + commitment (0.15) +
codebook (1.0) VQ losses; every `restart_every` steps, codes used fewer than
`restart_threshold` times since the last restart are re-drawn from random
projected encoder outputs of the current batch (dead-code restarts).

Acoustic codec (GAN): generator loss = mel_weight * multi-scale log-mel L1 +
adv_weight * LSGAN + feature_matching_weight * feature matching (multi-period
and multi-resolution spectrogram discriminators) + vq_weight * (commitment
0.25 + codebook 1.0), with quantizer dropout; discriminator loss = LSGAN.
`generator_step` and `discriminator_step` are separate pure functions (jit
them); the discriminator step takes the generator's output of the same batch.

  python -m metis_jax.codec_train --config configs/acoustic_codec_tiny.py \
      --wav_dir ../shared/data/speech --workdir /tmp/codec_tiny --steps 300
  python -m metis_jax.codec_train --config configs/semantic_codec.py \
      --config.model.vocos_num_layers=2 --synthetic_features --steps 200 --workdir /tmp/sem

Checkpoints: the final parameters are written in the released safetensors
layout (`<workdir>/semantic_codec.safetensors`, or `encoder.safetensors` and
`decoder.safetensors`), which the converters and `metis_jax.codec_report`
read. (Resumable Orbax checkpoints of the optimizer state are not written.)
"""

import glob
import os
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metis_jax import acoustic_codec as ac
from metis_jax import codec_losses
from metis_jax import semantic_codec as sc
from metis_jax.nn import discriminators
from metis_jax.nn import quantizer as vq


def make_optimizer(learning_rate: float, b1: float, b2: float, clip: float = 0.0, weight_decay: float = 0.0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
  lr = learning_rate
  if warmup_steps:
    lr = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  chain = [optax.clip_by_global_norm(clip)] if clip else []
  chain.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*chain)


# ----------------------------------------------------------------------------- semantic codec


@flax.struct.dataclass
class SemanticTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  usage: jax.Array  # [n_q, K] code counts since the last restart
  rng: jax.Array


class SemanticTrainer:
  """Holds the model, optimizer and jitted step of the semantic codec."""

  def __init__(self, model_cfg: sc.SemanticCodecConfig, train: ml_collections.ConfigDict):
    self.config = model_cfg
    self.train = train
    self.model = sc.SemanticCodec(model_cfg)
    self.tx = make_optimizer(train.learning_rate, train.adam_b1, train.adam_b2, train.grad_clip_norm,
                             train.weight_decay, train.warmup_steps)
    self.step = jax.jit(self._step, donate_argnums=0)

  def init(self, rng: jax.Array, params=None) -> SemanticTrainState:
    rng, init_rng = jax.random.split(rng)
    if params is None:
      params = jax.jit(lambda r: sc.init_params(self.model, r))(init_rng)
    c = self.config
    return SemanticTrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params),
                              jnp.zeros((c.num_quantizers, c.codebook_size), jnp.float32), rng)

  def _step(self, state: SemanticTrainState, feat: jax.Array, valid: jax.Array | None = None):
    t, c = self.train, self.config

    def loss_fn(params):
      out = self.model.apply({"params": params}, feat, valid)
      rec = sc.reconstruction_loss(out.reconstruction, feat, valid, t.l1_weight, t.mse_weight)
      return rec + out.commit_loss + out.codebook_loss, (rec, out)

    (loss, (rec, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    usage = state.usage + vq.codebook_usage(out.codes, c.codebook_size, valid)
    rng, restart_rng = jax.random.split(state.rng)
    restarted = jnp.zeros((), jnp.int32)
    if t.restart_every:
      do = (state.step + 1) % t.restart_every == 0
      layers = dict(params["quantizer"])
      weights = None if valid is None else valid.reshape(-1).astype(jnp.float32)
      for q in range(c.num_quantizers):
        z_e = out.vq.z_e[q].reshape(-1, c.codebook_dim)
        k1, k2, restart_rng = jax.random.split(restart_rng, 3)
        if weights is not None:  # candidates from valid frames only
          z_e = z_e[jax.random.choice(k1, z_e.shape[0], (z_e.shape[0],), p=weights / jnp.sum(weights))]
        layer = dict(layers[f"layers_{q}"])
        new_cb, n_dead = vq.restart_dead_codes(layer["codebook"], usage[q], jax.lax.stop_gradient(z_e), k2,
                                               t.restart_threshold)
        layer["codebook"] = jnp.where(do, new_cb, layer["codebook"])
        layers[f"layers_{q}"] = layer
        restarted = restarted + jnp.where(do, n_dead, 0).astype(jnp.int32)
      params = dict(params, quantizer=layers)
      usage = jnp.where(do, 0.0, usage)
    batch_usage = vq.codebook_usage(out.codes, c.codebook_size, valid)
    metrics = dict(loss=loss, reconstruction=rec, commit=out.commit_loss, codebook=out.codebook_loss,
                   perplexity=jnp.mean(vq.perplexity(batch_usage)),
                   codes_used=jnp.mean(jnp.sum(batch_usage > 0, axis=-1).astype(jnp.float32)),
                   restarted=restarted)
    return SemanticTrainState(state.step + 1, params, opt_state, usage, rng), metrics


def synthetic_features(rng: np.random.Generator, batch: int, frames: int, dim: int, clusters: int = 512,
                       seed: int = 1234, rank: int | None = None) -> np.ndarray:
  """Feature-like frames: each frame a noisy copy (noise 0.3) of one of `clusters` fixed
  unit-variance centers, held for a few frames (runs of 1-6), like phones in SSL features. The
  centers span a `rank`-dimensional subspace (default dim / 8), as SSL features are far from
  full rank."""
  crng = np.random.default_rng(seed)
  rank = rank or max(1, dim // 8)
  basis = crng.standard_normal((rank, dim)) / np.sqrt(rank)
  centers = (crng.standard_normal((clusters, rank)) @ basis).astype(np.float32)
  out = np.empty((batch, frames, dim), np.float32)
  for b in range(batch):
    t = 0
    while t < frames:
      run = int(rng.integers(1, 7))
      out[b, t:t + run] = centers[rng.integers(clusters)]
      t += run
  return out + 0.3 * rng.standard_normal(out.shape).astype(np.float32)


# ----------------------------------------------------------------------------- acoustic codec


@flax.struct.dataclass
class AcousticTrainState:
  step: jax.Array
  gen_params: Any
  disc_params: Any
  gen_opt_state: Any
  disc_opt_state: Any
  rng: jax.Array


class AcousticTrainer:
  """Model, discriminators, optimizers and the two jitted GAN steps of the acoustic codec."""

  def __init__(self, model_cfg: ac.AcousticCodecConfig, train: ml_collections.ConfigDict):
    self.config = model_cfg
    self.train = train
    self.model = ac.AcousticCodec(model_cfg)
    self.disc = discriminators.CodecDiscriminator(tuple(train.mpd_periods), tuple(train.mrd_ffts),
                                                  train.disc_channels, train.disc_max_channels)
    opt = lambda: make_optimizer(train.learning_rate, train.adam_b1, train.adam_b2, train.grad_clip_norm)
    self.gen_tx, self.disc_tx = opt(), opt()
    self.generator_step = jax.jit(self._generator_step)
    self.discriminator_step = jax.jit(self._discriminator_step)

  def init(self, rng: jax.Array, crop_samples: int, gen_params=None) -> AcousticTrainState:
    rng, g_rng, d_rng = jax.random.split(rng, 3)
    if gen_params is None:
      gen_params = jax.jit(lambda r: ac.init_params(self.model, r))(g_rng)
    wav = jnp.zeros((1, crop_samples), jnp.float32)
    disc_params = jax.jit(lambda r: nn.unbox(self.disc.init(r, wav)["params"]))(d_rng)
    return AcousticTrainState(jnp.zeros((), jnp.int32), gen_params, disc_params, self.gen_tx.init(gen_params),
                              self.disc_tx.init(disc_params), rng)

  def _generator_step(self, state: AcousticTrainState, wav: jax.Array):
    """One generator update on `[batch, samples]` -> (state, metrics, generated wav)."""
    t = self.train
    rng, drop_rng = jax.random.split(state.rng)
    gan_on = (state.step >= t.disc_start_step).astype(jnp.float32)

    def loss_fn(gp):
      out = self.model.apply({"params": gp}, wav, train=True, rngs={"dropout": drop_rng})
      fake = out.wav
      real = wav[:, :fake.shape[1]]
      mel = codec_losses.multiscale_mel_loss(fake, real, self.config.sample_rate, tuple(t.mel_windows),
                                             tuple(t.mel_bins))
      real_logits, real_feats = self.disc.apply({"params": state.disc_params}, real)
      fake_logits, fake_feats = self.disc.apply({"params": state.disc_params}, fake)
      adv = codec_losses.lsgan_generator_loss(fake_logits)
      fm = codec_losses.feature_matching_loss(real_feats, fake_feats)
      vq_loss = out.commit_loss + out.codebook_loss
      total = (t.mel_weight * mel + gan_on * (t.adv_weight * adv + t.feature_matching_weight * fm)
               + t.vq_weight * vq_loss)
      return total, dict(loss=total, mel=mel, adv=adv, feature_matching=fm, commit=out.commit_loss,
                         codebook=out.codebook_loss, fake=fake)

    grads, aux = jax.grad(loss_fn, has_aux=True)(state.gen_params)
    fake = aux.pop("fake")
    updates, opt_state = self.gen_tx.update(grads, state.gen_opt_state, state.gen_params)
    params = optax.apply_updates(state.gen_params, updates)
    aux["grad_norm"] = optax.tree.norm(grads)
    state = state.replace(step=state.step + 1, gen_params=params, gen_opt_state=opt_state, rng=rng)
    return state, aux, fake

  def _discriminator_step(self, state: AcousticTrainState, wav: jax.Array, fake: jax.Array):
    """One discriminator update on real `wav` and the generator's `fake` -> (state, metrics)."""
    real = wav[:, :fake.shape[1]]
    fake = jax.lax.stop_gradient(fake)

    def loss_fn(dp):
      real_logits, _ = self.disc.apply({"params": dp}, real)
      fake_logits, _ = self.disc.apply({"params": dp}, fake)
      return codec_losses.lsgan_discriminator_loss(real_logits, fake_logits)

    loss, grads = jax.value_and_grad(loss_fn)(state.disc_params)
    updates, opt_state = self.disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    state = state.replace(disc_params=optax.apply_updates(state.disc_params, updates), disc_opt_state=opt_state)
    return state, dict(disc_loss=loss)


def load_speech(wav_dir: str, sample_rate: int) -> list[np.ndarray]:
  """Mono float32 clips at `sample_rate` from `wav_dir/*.wav` (others are skipped)."""
  import soundfile as sf
  clips = []
  for path in sorted(glob.glob(os.path.join(wav_dir, "*.wav"))):
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != sample_rate:
      continue
    clips.append(audio.mean(axis=1))
  return clips


def random_crops(rng: np.random.Generator, clips: list[np.ndarray], batch: int, samples: int) -> np.ndarray:
  out = np.zeros((batch, samples), np.float32)
  for b in range(batch):
    clip = clips[rng.integers(len(clips))]
    if len(clip) <= samples:
      out[b, :len(clip)] = clip
    else:
      start = int(rng.integers(len(clip) - samples))
      out[b] = clip[start:start + samples]
  return out


# ----------------------------------------------------------------------------- CLI


def _main(argv):
  del argv
  from absl import flags
  from metis_jax.conversion import acoustic_codec as ac_conv
  from metis_jax.conversion import semantic_codec as sc_conv
  f = flags.FLAGS
  config = f.config
  os.makedirs(f.workdir, exist_ok=True)
  steps = f.steps or config.train.steps
  rng = np.random.default_rng(config.seed)
  log_every = max(1, steps // 20)
  if "encoder_dim" in config.model:
    model_cfg = ac.AcousticCodecConfig.from_config(config.model)
    trainer = AcousticTrainer(model_cfg, config.train)
    clips = load_speech(f.wav_dir, model_cfg.sample_rate)
    if not clips:
      raise SystemExit(f"no {model_cfg.sample_rate} Hz .wav files in {f.wav_dir}")
    crop = int(config.train.crop_seconds * model_cfg.sample_rate) // model_cfg.hop_size * model_cfg.hop_size
    state = trainer.init(jax.random.key(config.seed), crop)
    start = time.time()
    for step in range(1, steps + 1):
      wav = jnp.asarray(random_crops(rng, clips, config.train.batch_size, crop))
      state, metrics, fake = trainer.generator_step(state, wav)
      state, d_metrics = trainer.discriminator_step(state, wav, fake)
      if step % log_every == 0 or step == 1:
        m = {k: float(v) for k, v in {**metrics, **d_metrics}.items()}
        print(f"step {step:5d}  mel {m['mel']:.4f}  adv {m['adv']:.4f}  fm {m['feature_matching']:.4f}  "
              f"commit {m['commit']:.4f}  codebook {m['codebook']:.4f}  disc {m['disc_loss']:.4f}  "
              f"({time.time() - start:.0f} s)", flush=True)
    ac_conv.save_amphion(os.path.join(f.workdir, "encoder.safetensors"),
                         os.path.join(f.workdir, "decoder.safetensors"),
                         jax.tree_util.tree_map(np.asarray, state.gen_params), model_cfg)
  else:
    model_cfg = sc.SemanticCodecConfig.from_config(config.model)
    trainer = SemanticTrainer(model_cfg, config.train)
    state = trainer.init(jax.random.key(config.seed))
    if not f.synthetic_features:
      raise SystemExit("semantic-codec training from a feature corpus is not wired here; use --synthetic_features")
    start = time.time()
    for step in range(1, steps + 1):
      feat = jnp.asarray(synthetic_features(rng, config.train.batch_size, config.train.crop_frames,
                                            model_cfg.hidden_size))
      state, metrics = trainer.step(state, feat)
      if step % log_every == 0 or step == 1:
        m = {k: float(v) for k, v in metrics.items()}
        print(f"step {step:5d}  loss {m['loss']:.4f}  rec {m['reconstruction']:.4f}  commit {m['commit']:.4f}  "
              f"codebook {m['codebook']:.4f}  codes used {m['codes_used']:.0f}  perplexity {m['perplexity']:.1f}  "
              f"restarted {m['restarted']}  ({time.time() - start:.0f} s)", flush=True)
    sc_conv.save_amphion(os.path.join(f.workdir, "semantic_codec.safetensors"),
                         jax.tree_util.tree_map(np.asarray, state.params), model_cfg)
  print(f"wrote the trained parameters to {f.workdir}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Codec config file (configs/*codec*.py).")
  flags.DEFINE_string("workdir", None, "Output folder.")
  flags.DEFINE_integer("steps", 0, "Training steps (0: the config's).")
  flags.DEFINE_string("wav_dir", "../shared/data/speech", "24 kHz .wav files (acoustic codec).")
  flags.DEFINE_bool("synthetic_features", False, "Train the semantic codec on synthetic features.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
