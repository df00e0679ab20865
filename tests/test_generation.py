"""SSL tokens + acoustic prompt -> waveform, through two tiny S2A models and a tiny codec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metis_jax import config_lib
from metis_jax.inference import generation, s2a_decoding
from metis_jax.models import acoustic_codec, s2a


def _stage(num_quantizers, first, seed, steps):
  cfg = config_lib.load_config("tiny").model
  cfg.kind, cfg.vocab_size, cfg.cond_vocab_size = "s2a", 16, 64
  cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.dtype = 32, 2, 1, "float32"
  cfg.num_quantizers, cfg.predicts_first_layer = num_quantizers, first
  model = s2a.S2AModel(s2a.S2AConfig.from_config(cfg))
  params = s2a.init_params(model, jax.random.key(seed))
  options = s2a_decoding.S2ADecodeOptions(steps=steps, cfg=2.5)
  return generation.S2AStage(model, params, options)


@pytest.fixture(scope="module")
def renderer():
  codec_cfg = acoustic_codec.AcousticCodecConfig(
      encoder_dim=4, latent_dim=8, num_quantizers=12, codebook_size=16, vocos_dim=16,
      vocos_intermediate_dim=32, vocos_num_layers=1)
  codec_model = acoustic_codec.AcousticCodec(codec_cfg)
  codec = acoustic_codec.AcousticCodecInference(
      codec_cfg, acoustic_codec.init_params(codec_model, jax.random.key(0)))
  first = _stage(1, True, 1, (3,))
  full = _stage(12, False, 2, (3, 2) + (1,) * 10)
  return generation.SpeechRenderer(full, codec, first_layer=first)


def test_join_prompt_and_target_packs_rows():
  prompt = jnp.array([[1, 2, 3], [4, 0, 0]])
  target = jnp.array([[7, 8], [9, 10]])
  out = generation.join_prompt_and_target(prompt, jnp.array([3, 1]), target, jnp.array([1, 2]))
  np.testing.assert_array_equal(out, [[1, 2, 3, 7, 0], [4, 9, 10, 0, 0]])


@pytest.mark.slow
def test_renders_each_target_token_to_one_hop_and_is_reproducible(renderer):
  rng = np.random.default_rng(0)
  sem_prompt = jnp.asarray(rng.integers(0, 64, (2, 6)))
  # Acoustic prompts one frame longer than the SSL prompts, as real clips are.
  ac_prompt = jnp.asarray(rng.integers(0, 16, (2, 7, 12)))
  target = jnp.asarray(rng.integers(0, 64, (2, 9)))
  args = (sem_prompt, jnp.array([6, 4]), ac_prompt, jnp.array([7, 5]), target, jnp.array([9, 5]))
  wav, lengths, codes = renderer(jax.random.key(3), *args)
  assert wav.shape == (2, 9 * 480) and codes.shape == (2, 9, 12)
  np.testing.assert_array_equal(np.asarray(lengths), [9 * 480, 5 * 480])
  assert np.all(np.asarray(wav)[1, 5 * 480:] == 0)
  assert np.all(np.isfinite(np.asarray(wav))) and np.abs(np.asarray(wav)[0]).max() > 0
  assert (np.asarray(codes)[1, 5:] == 0).all()
  again, _, codes_again = renderer(jax.random.key(3), *args)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(codes_again))
  np.testing.assert_array_equal(np.asarray(wav), np.asarray(again))


@pytest.mark.slow
def test_full_model_without_layer0_needs_the_first_layer_model(renderer):
  with pytest.raises(ValueError, match="layer 0"):
    generation.SpeechRenderer(renderer.full, renderer.codec)
