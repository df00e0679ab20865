"""The codec training state and its sharded creation (the codecs' `train_state`).

One state for both codecs: `params` and `opt_state` are dicts keyed by
network, 'generator' (the codec) and, for the acoustic codec,
'discriminator'. Every parameter carries logical axis names, so the state's
shardings follow `config.mesh.logical_axis_rules` and the state is created by
a jitted init with those `out_shardings` (no host holds a whole parameter).

The frozen w2v-BERT encoder that makes the semantic codec's input features
(`FrozenEncoder`) is not part of the state: it is never trained, so it is
loaded (or, for tests, randomly initialized) at start-up, sharded by the same
rules, and passed to the train step as an argument.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from metis_jax.models import acoustic_codec as ac
from metis_jax.frontend import fbank
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import optimizer as optimizer_lib
from metis_jax.models import semantic_codec as sc
from metis_jax.models import w2v_bert
from metis_jax.nn import discriminators

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
# `train.codebook_init`: N(0, 1) rows, or rows drawn from the first batch (codec_train_step).
CODEBOOK_INITS = ("random", "data")
# Audio samples of one w2v-BERT frame (two 10 ms filterbank frames).
SAMPLES_PER_FEATURE_FRAME = fbank.HOP_LENGTH * fbank.STRIDE


@flax.struct.dataclass
class CodecTrainState:
  """Everything a resumed codec run needs besides the data iterator.

  Attributes:
    step: int32 scalar, steps done (applied + skipped).
    params: {'generator': codec params, 'discriminator': ...} (float32).
    opt_state: optax states with the same keys (each counts its applied updates).
    rng: uint32 `[2]` raw key data of the run's base key; step s draws from
      `fold_in(key(rng), s)`, so a resumed run draws the same numbers.
    skipped_steps: {network: int32 scalar}, updates skipped for a non-finite
      loss or gradient norm.
    usage: float32 `[n_q, K]` code counts since the last dead-code restart.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: Any
  usage: jax.Array


@dataclasses.dataclass(frozen=True)
class CodecSetup:
  """The static pieces of a codec run, built once from the config.

  Attributes:
    kind: 'acoustic_codec' or 'semantic_codec'.
    codec: the codec module (the generator).
    codec_config: its dataclass config.
    disc: the discriminators (acoustic codec) or None.
    optimizers: {network: its `optimizer.Optimizer`}.
    rules: logical axis rules.
    sample_rate: rate of the training audio (24 kHz acoustic, 16 kHz semantic).
    crop: samples per audio crop (or frames per synthetic feature crop).
    encoder: w2v-BERT config of the frozen feature encoder (semantic codec
      trained from audio), else None.
  """
  kind: str
  codec: nn.Module
  codec_config: Any
  disc: Optional[nn.Module]
  optimizers: dict
  rules: tuple
  sample_rate: int
  crop: int
  encoder: Optional[w2v_bert.W2VBertConfig] = None

  @property
  def networks(self) -> tuple[str, ...]:
    return (GENERATOR,) if self.disc is None else (GENERATOR, DISCRIMINATOR)

  @property
  def from_audio(self) -> bool:
    """Whether batches are audio crops (else synthetic feature frames)."""
    return self.kind == ac.KIND or self.encoder is not None


def acoustic_crop(train: ml_collections.ConfigDict, codec: ac.AcousticCodecConfig) -> int:
  """Samples per acoustic crop: crop_seconds at the codec rate, a multiple of the hop."""
  crop = int(train.crop_seconds * codec.sample_rate) // codec.hop_size * codec.hop_size
  if crop < codec.hop_size:
    raise ValueError(f"train.crop_seconds={train.crop_seconds} is shorter than one hop")
  return crop


def semantic_crop(frames: int) -> int:
  """16 kHz samples that give exactly `frames` valid w2v-BERT frames (2 * frames filterbank frames)."""
  samples = SAMPLES_PER_FEATURE_FRAME * frames + (fbank.FRAME_LENGTH - fbank.HOP_LENGTH)
  assert int(fbank.num_tokens(samples)) == frames and int(fbank.num_frames(samples)) == 2 * frames
  return samples


def encoder_config(config: ml_collections.ConfigDict) -> Optional[w2v_bert.W2VBertConfig]:
  """The w2v-BERT config of a semantic run's feature encoder (None for synthetic features)."""
  f = config.features
  if f.source == "synthetic":
    return None
  if f.source == "random_w2v_bert":
    return w2v_bert.W2VBertConfig(hidden_size=f.hidden_size, num_layers=f.output_layer,
                                  output_layer=f.output_layer, num_heads=f.num_heads,
                                  intermediate_size=f.intermediate_size, dtype=f.dtype)
  if f.source == "w2v_bert":
    if not f.w2v_bert_weights or not f.w2v_bert_stats:
      raise ValueError("features.source='w2v_bert' needs features.w2v_bert_weights (model.safetensors of "
                       "facebook/w2v-bert-2.0) and features.w2v_bert_stats (.npz); or use "
                       "features.source='random_w2v_bert' / 'synthetic' for smoke runs")
    return _file_encoder_config(f)
  raise ValueError(f"unknown features.source {f.source!r}; expected 'w2v_bert', 'random_w2v_bert' or 'synthetic'")


def _file_encoder_config(f: ml_collections.ConfigDict) -> w2v_bert.W2VBertConfig:
  """The config of the released encoder file (config.json beside it, else its shapes)."""
  import json  # pylint: disable=import-outside-toplevel
  from metis_jax.conversion import common  # pylint: disable=import-outside-toplevel
  from metis_jax.conversion import w2v_bert as convert  # pylint: disable=import-outside-toplevel
  hf_json = os.path.join(os.path.dirname(f.w2v_bert_weights), "config.json")
  overrides = dict(output_layer=f.output_layer, dtype=f.dtype)
  if os.path.exists(hf_json):
    with open(hf_json) as fh:
      return w2v_bert.W2VBertConfig.from_hf_config(json.load(fh), **overrides)
  tensors, _ = common.load_safetensors(f.w2v_bert_weights)
  return dataclasses.replace(convert.infer_config(tensors, output_layer=f.output_layer), dtype=f.dtype)


def make_setup(config: ml_collections.ConfigDict) -> CodecSetup:
  """Models, optimizers, rules and crop sizes of a codec run config (`config_base.*_codec_config`)."""
  kind = config.model.get("kind", "")
  rules = mesh_lib.logical_rules(config)
  t = config.train
  if t.get("codebook_init", "random") not in CODEBOOK_INITS:
    raise ValueError(f"train.codebook_init must be one of {CODEBOOK_INITS}, got {t.codebook_init!r}")
  if kind == ac.KIND:
    codec_cfg = ac.AcousticCodecConfig.from_config(config.model)
    disc = discriminators.CodecDiscriminator(tuple(t.mpd_periods), tuple(t.mrd_ffts), t.disc_channels,
                                             t.disc_max_channels)
    optimizer = optimizer_lib.make_optimizer(t)  # same settings for both networks; it holds no state
    optimizers = {GENERATOR: optimizer, DISCRIMINATOR: optimizer}
    return CodecSetup(kind, ac.AcousticCodec(codec_cfg), codec_cfg, disc, optimizers, rules, codec_cfg.sample_rate,
                      acoustic_crop(t, codec_cfg))
  if kind == sc.KIND:
    codec_cfg = sc.SemanticCodecConfig.from_config(config.model)
    encoder = encoder_config(config)
    if encoder is not None and encoder.hidden_size != codec_cfg.hidden_size:
      raise ValueError(f"the feature encoder is {encoder.hidden_size} wide but model.hidden_size is "
                       f"{codec_cfg.hidden_size}")
    crop = semantic_crop(t.crop_frames) if encoder is not None else int(t.crop_frames)
    return CodecSetup(kind, sc.SemanticCodec(codec_cfg), codec_cfg, None,
                      {GENERATOR: optimizer_lib.make_optimizer(t)}, rules, fbank.SAMPLE_RATE, crop, encoder)
  raise ValueError(f"not a codec config: model.kind={kind!r} (expected {ac.KIND!r} or {sc.KIND!r})")


def _init_params(setup: CodecSetup, key: jax.Array) -> dict:
  """Boxed parameters of every network (dummy inputs of batch 1)."""
  k_gen, k_disc = jax.random.split(key)
  if setup.kind == ac.KIND:
    wav = jnp.zeros((1, 2 * setup.codec_config.hop_size), jnp.float32)
    gen = setup.codec.init({"params": k_gen}, wav, train=False)["params"]
  else:
    feat = jnp.zeros((1, 8, setup.codec_config.hidden_size), jnp.float32)
    gen = setup.codec.init({"params": k_gen}, feat)["params"]
  params = {GENERATOR: gen}
  if setup.disc is not None:
    params[DISCRIMINATOR] = setup.disc.init(k_disc, jnp.zeros((1, setup.crop), jnp.float32))["params"]
  return params


def init_fn(setup: CodecSetup, seed: int, boxed: bool = False) -> Callable[[], CodecTrainState]:
  """A zero-argument function building the state from `seed` (the key is made inside)."""

  def init() -> CodecTrainState:
    init_key, run_key = jax.random.split(jax.random.key(seed))
    params = _init_params(setup, init_key)
    if not boxed:
      params = nn.unbox(params)
    c = setup.codec_config
    return CodecTrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state={k: setup.optimizers[k].init(params[k]) for k in setup.networks},
        rng=jax.random.key_data(run_key),
        skipped_steps={k: jnp.zeros((), jnp.int32) for k in setup.networks},
        usage=jnp.zeros((c.num_quantizers, c.codebook_size), jnp.float32))

  return init


def state_shardings(setup: CodecSetup, mesh: Mesh) -> CodecTrainState:
  """State-shaped pytree of NamedShardings: parameters and moments by their logical names."""
  specs = nn.get_partition_spec(jax.eval_shape(init_fn(setup, 0, boxed=True)))
  return nn.logical_to_mesh_sharding(specs, mesh, setup.rules)


def abstract_state(setup: CodecSetup, mesh: Mesh) -> CodecTrainState:
  """The state as `jax.ShapeDtypeStruct`s carrying their target shardings (for restoring)."""
  shapes = jax.eval_shape(init_fn(setup, 0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      state_shardings(setup, mesh))


def create_sharded_state(setup: CodecSetup, mesh: Mesh, seed: int) -> CodecTrainState:
  """Initializes the state directly in its sharded layout (jit with out_shardings)."""
  return jax.jit(init_fn(setup, seed), out_shardings=state_shardings(setup, mesh))()


# ----------------------------------------------------------------------------- frozen feature encoder


@flax.struct.dataclass
class FrozenEncoder:
  """w2v-BERT parameters and the feature normalization statistics (`[hidden]` each)."""
  params: Any
  mean: jax.Array
  var: jax.Array


def _encoder_boxed(config: w2v_bert.W2VBertConfig, key: jax.Array):
  return w2v_bert.W2VBert(config).init(key, jnp.zeros((1, 8, config.input_dim), jnp.float32))["params"]


def encoder_shardings(config: w2v_bert.W2VBertConfig, mesh: Mesh, rules: tuple) -> FrozenEncoder:
  specs = nn.get_partition_spec(jax.eval_shape(lambda: _encoder_boxed(config, jax.random.key(0))))
  params = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return FrozenEncoder(params, mesh_lib.replicated(mesh), mesh_lib.replicated(mesh))


def abstract_encoder(config: w2v_bert.W2VBertConfig, mesh: Mesh, rules: tuple) -> FrozenEncoder:
  """The frozen encoder as `jax.ShapeDtypeStruct`s with their shardings: what an ahead-of-time
  compile takes in place of the weights (nothing is allocated or read)."""
  hidden = config.hidden_size
  shapes = jax.eval_shape(lambda: FrozenEncoder(nn.unbox(_encoder_boxed(config, jax.random.key(0))),
                                                jnp.zeros((hidden,), jnp.float32),
                                                jnp.ones((hidden,), jnp.float32)))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes, encoder_shardings(config, mesh, rules))


def create_encoder(setup: CodecSetup, config: ml_collections.ConfigDict, mesh: Mesh) -> Optional[FrozenEncoder]:
  """The frozen feature encoder of a semantic run from audio, sharded on `mesh` (else None).

  'random_w2v_bert': random parameters from `config.seed` (mean 0, var 1).
  'w2v_bert': the released weights and statistics from `config.features`.
  """
  if setup.encoder is None:
    return None
  shardings = encoder_shardings(setup.encoder, mesh, setup.rules)
  hidden = setup.encoder.hidden_size
  if config.features.source == "random_w2v_bert":
    enc_cfg = setup.encoder

    def init():
      params = nn.unbox(_encoder_boxed(enc_cfg, jax.random.fold_in(jax.random.key(config.seed), 17)))
      return FrozenEncoder(params, jnp.zeros((hidden,), jnp.float32), jnp.ones((hidden,), jnp.float32))

    return jax.jit(init, out_shardings=shardings)()
  from metis_jax.conversion import w2v_bert as convert  # pylint: disable=import-outside-toplevel
  _, params = convert.load_hf(config.features.w2v_bert_weights, setup.encoder)
  mean, var = convert.load_stats(config.features.w2v_bert_stats, hidden)
  host = FrozenEncoder(params, np.asarray(mean, np.float32), np.asarray(var, np.float32))
  return jax.device_put(host, shardings)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
