"""Full run configs of the two codecs (what `configs/*codec*.py` start from).

A codec run config has the sections of a stage-1 run (`config_base`): `model`
(the codec's fields plus `kind`, 'acoustic_codec' or 'semantic_codec', which
is how a trainer recognizes a codec run), `train` (the codec's training
knobs, from its module), `mesh`, `checkpoint` and `logging` (the stage-1
builders, same meaning), `data` (raw audio, see `data_config`), `seed`, and
for the semantic codec `features` (where its input features come from).
"""

import ml_collections

from metis_jax.models import acoustic_codec
from metis_jax import config_base
from metis_jax.models import semantic_codec

KINDS = (acoustic_codec.KIND, semantic_codec.KIND)


def is_codec_config(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` describes a codec run (`config.model.kind` in KINDS)."""
  return config.model.get("kind", "metis") in KINDS


def data_config() -> ml_collections.ConfigDict:
  """Raw audio for codec training (metis_jax.data.waveform_pipeline).

  Crops are read at the codec's rate (24 kHz acoustic, 16 kHz semantic):
  files are decoded, down-mixed and resampled (polyphase) on the fly.
  """
  c = ml_collections.ConfigDict()
  # Audio corpora: folders (wav/flac/mp3/ogg, walked recursively), single
  # files, globs, or ArrayRecord shards of encoded audio files (a folder or
  # glob of `*.array_record`, written by `waveform_pipeline.write_audio_shards`).
  c.train_sources = ()
  # With no `train_sources`: synthesize the espeak-ng demo corpus under
  # `<workdir>/demo_data/corpus` (reused on resume) and train on it.
  c.demo_corpus = False
  # Mixture weights of train_sources (empty = equal).
  c.train_weights = ()
  # Passes over the files; 0 = repeat forever (training).
  c.num_epochs = 0
  # Seed of the file shuffle and the crop offsets.
  c.seed = 0
  # Grain worker processes decoding audio (0 = in the main process).
  c.num_workers = 2
  # Elements each worker prepares ahead.
  c.worker_buffer_size = 16
  # Files whose peak stays below this level (dBFS) are skipped as silent
  # (counted with the undecodable ones).
  c.silence_threshold_db = -60.0
  return c


def features_config() -> ml_collections.ConfigDict:
  """Input features of the semantic codec, computed inside the train step from 16 kHz crops."""
  c = ml_collections.ConfigDict()
  # 'w2v_bert': normalized layer-`output_layer` features of the released
  #   w2v-BERT 2.0 (`w2v_bert_weights` + `w2v_bert_stats`), frozen.
  # 'random_w2v_bert': a randomly initialized encoder of the sizes below
  #   (seeded by config.seed), no normalization statistics. Its features are
  #   NOT SSL features (no phonetic content): for tests and smoke runs only.
  # 'synthetic': no audio; clustered feature-like frames
  #   (codec_train.synthetic_features), for quick checks of the codec itself.
  c.source = "w2v_bert"
  # facebook/w2v-bert-2.0 `model.safetensors` and the statistics .npz
  # (`metis_jax.conversion.w2v_bert.convert_stats`).
  c.w2v_bert_weights = ""
  c.w2v_bert_stats = ""
  # Block whose output is the feature (17 in Metis).
  c.output_layer = 17
  # Sizes of the 'random_w2v_bert' encoder (hidden_size must equal
  # model.hidden_size; the released encoder is read from its file).
  c.hidden_size = 1024
  c.num_heads = 16
  c.intermediate_size = 4096
  # Compute dtype of the encoder ('bfloat16' on accelerators).
  c.dtype = "float32"
  # 'synthetic': number of cluster centers of the frames.
  c.synthetic_clusters = 512
  return c


def _run_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.mesh = config_base.mesh_config()
  config.checkpoint = config_base.checkpoint_config()
  config.logging = config_base.logging_config()
  config.data = data_config()
  config.seed = 0
  return config


def acoustic_config() -> ml_collections.ConfigDict:
  """The acoustic codec at the released size, with every run section."""
  config = ml_collections.ConfigDict()
  config.model = acoustic_codec.model_config()
  config.train = acoustic_codec.train_config()
  return _run_sections(config)


def semantic_config() -> ml_collections.ConfigDict:
  """The semantic codec at the released size, with every run section (features from w2v-BERT 2.0)."""
  config = ml_collections.ConfigDict()
  config.model = semantic_codec.model_config()
  config.train = semantic_codec.train_config()
  config = _run_sections(config)
  config.features = features_config()
  return config
