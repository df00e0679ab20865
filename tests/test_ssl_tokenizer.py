"""The w2v-BERT + semantic codec tokenizer behind the data job's tokenizer interface."""

import jax
import numpy as np

from metis_jax import semantic_codec, ssl_tokenizer, w2v_bert
from metis_jax.data import tokenizer as tokenizer_lib


def _tiny_tokenizer():
  enc_cfg = w2v_bert.W2VBertConfig.small()
  enc_params = w2v_bert.init_params(enc_cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  mean = rng.standard_normal(enc_cfg.hidden_size).astype(np.float32) * 0.1
  var = (0.5 + rng.random(enc_cfg.hidden_size)).astype(np.float32)
  codec_cfg = semantic_codec.SemanticCodecConfig(
      codebook_size=64, hidden_size=enc_cfg.hidden_size, codebook_dim=8, vocos_dim=16,
      vocos_intermediate_dim=32, vocos_num_layers=1)
  codec_params = semantic_codec.init_params(semantic_codec.SemanticCodec(codec_cfg), jax.random.key(1))
  return ssl_tokenizer.W2VBertCodecTokenizer(enc_cfg, enc_params, mean, var, codec_cfg, codec_params)


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
