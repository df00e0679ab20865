"""The w2v-BERT + semantic codec tokenizer behind the data job's tokenizer interface."""

import jax
import numpy as np
import pytest

from metis_jax.parallel import batch_layout
from metis_jax import config_lib
from metis_jax.models import semantic_codec, w2v_bert
from metis_jax.frontend import ssl_tokenizer
from metis_jax.data import tokenize as tokenize_job
from metis_jax.data import tokenizer as tokenizer_lib


def _tiny_tokenizer(num_devices=1):
  enc_cfg = w2v_bert.W2VBertConfig.small()
  enc_params = w2v_bert.init_params(enc_cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  mean = rng.standard_normal(enc_cfg.hidden_size).astype(np.float32) * 0.1
  var = (0.5 + rng.random(enc_cfg.hidden_size)).astype(np.float32)
  codec_cfg = semantic_codec.SemanticCodecConfig(
      codebook_size=64, hidden_size=enc_cfg.hidden_size, codebook_dim=8, vocos_dim=16,
      vocos_intermediate_dim=32, vocos_num_layers=1)
  codec_params = semantic_codec.init_params(semantic_codec.SemanticCodec(codec_cfg), jax.random.key(1))
  return ssl_tokenizer.W2VBertCodecTokenizer(enc_cfg, enc_params, mean, var, codec_cfg, codec_params,
                                             batch_layout.BatchLayout.local(num_devices))


@pytest.mark.slow
def test_tokenizes_batches_like_single_utterances_and_round_trips(tmp_path):
  tok = _tiny_tokenizer()
  assert isinstance(tok, tokenizer_lib.SSLTokenizer)
  rng = np.random.default_rng(1)
  lengths = np.array([16000, 9000])
  wav = np.zeros((2, 16000), np.float32)
  for i, n in enumerate(lengths):
    wav[i, :n] = 0.1 * rng.standard_normal(n)
  codes, token_lengths = tok.tokenize(wav, lengths)
  expected = [tokenizer_lib.num_ssl_frames(n) for n in lengths]
  np.testing.assert_array_equal(token_lengths, expected)
  assert codes.shape == (2, tokenizer_lib.num_ssl_frames(16000))
  assert (codes[1, expected[1]:] == 0).all() and ((codes >= 0) & (codes < 64)).all()
  alone, _ = tok.tokenize(wav[1:, :9000], lengths[1:])
  np.testing.assert_array_equal(alone[0], codes[1, :expected[1]])
  _, _, feats = tok.encode(wav, lengths)
  assert feats.shape == (2, codes.shape[1], tok.encoder_config.hidden_size)

  tok.save(str(tmp_path / "tok"))
  loaded = tokenizer_lib.load_tokenizer(str(tmp_path / "tok"))
  assert type(loaded).__name__ == "W2VBertCodecTokenizer"
  again, _ = loaded.tokenize(wav, lengths)
  np.testing.assert_array_equal(again, codes)


@pytest.mark.slow
def test_sharded_tokenizer_gives_the_unsharded_codes():
  """3 utterances of different lengths, padded to 4 rows over 2 devices, tokenize as on one."""
  sharded = _tiny_tokenizer(num_devices=2)
  single = sharded.with_layout(batch_layout.BatchLayout.local(1))
  assert (sharded.layout.shards, single.layout.shards) == (2, 1)
  rng = np.random.default_rng(2)
  lengths = np.array([16000, 7000, 12345])
  wav = np.zeros((3, 16000), np.float32)
  for i, n in enumerate(lengths):
    wav[i, :n] = 0.1 * rng.standard_normal(n)
  codes, token_lengths, feats = sharded.encode(wav, lengths)
  codes1, token_lengths1, feats1 = single.encode(wav, lengths)
  assert codes.shape == (3, tokenizer_lib.num_ssl_frames(16000))
  np.testing.assert_array_equal(token_lengths, [tokenizer_lib.num_ssl_frames(n) for n in lengths])
  np.testing.assert_array_equal(token_lengths, token_lengths1)
  np.testing.assert_array_equal(codes, codes1)
  np.testing.assert_allclose(feats, feats1, atol=1e-5)
  assert len(set(codes[0].tolist())) > 1  # not a degenerate tokenizer
  # The parameters sit replicated on both devices; the jitted function has explicit shardings.
  assert sharded.codec_params is not None
  leaf = jax.tree.leaves(sharded.encoder_params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2

  # The tokenization job hands such a tokenizer numpy batches of a multiple of its devices (here
  # the 4 x 16000 batch above: no new compilation).
  cfg = config_lib.load_config("tiny").data
  cfg.tokenize_bucket_seconds, cfg.tokenize_batch_seconds = 1.0, 8.0
  runner = tokenize_job.DeviceRunner(sharded, cfg)
  assert runner.shards_itself and runner.multiple == 2
  out = runner([wav[i, :n] for i, n in enumerate(lengths)])
  for i, n in enumerate(lengths):
    np.testing.assert_array_equal(out[i], codes1[i, :token_lengths1[i]])
