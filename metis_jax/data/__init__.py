"""The data side of metis_jax: corpora -> tokens -> ArrayRecord -> Grain batches.

Modules (one concept each; nothing here is imported eagerly, so Grain worker
processes only load what they use):

  audio         decode, mono down-mix, band-limited resampling, sanity checks.
  readers       corpus layouts (directory trees, Emilia tars, Libri-Light,
                LibriTTS) turned into work units of utterances.
  tokenizer     the SSL tokenizer interface and a k-means tokenizer.
  acoustic_kmeans  a residual k-means acoustic tokenizer (the S2A demo's codes).
  fit_kmeans    `python -m metis_jax.data.fit_kmeans`: fits that tokenizer.
  records       the compact byte format of one tokenized utterance.
  shards        ArrayRecord shards (group_size:1), written then renamed.
  manifest      per-shard statistics and the corpus manifest.json.
  tokenize      `python -m metis_jax.data.tokenize`: the tokenization job.
  pipeline      the Grain training pipeline and global jax.Array batches.
  demo_corpus   `python -m metis_jax.data.demo_corpus`: a small espeak-ng corpus.
  demo          the default jobs' data: that corpus tokenized (with acoustic
                tokens and a held-out split for S2A).
  tfds_builder  a TFDS builder (`tfds build`) into ArrayRecord.
  synthetic     random token shards in the real format (tests, benchmarks).
"""
