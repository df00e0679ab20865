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
  batches       the one batch path: Grain source chain, host iterator, global jax.Array batches.
  bucketing     length buckets from a schedule every host computes alike (no collective).
  pipeline      token batches: decode, crop, stream alignment, buckets.
  waveform_pipeline  audio crops for codec training (corrupt files skipped and counted).
  tasks         fine-tuning task data (SE/TSE/VC/TTS/L2S/Omni) made on the fly.
  noise         noise / room-response sources, SNR mixing, synthetic demo noise.
  perturb       VC timbre perturbation (pitch + formant shift).
  condition_features  cheap 50 Hz condition features; L2S x2 interpolation.
  make_demo_noise  `python -m metis_jax.data.make_demo_noise`.
  demo_corpus   `python -m metis_jax.data.demo_corpus`: a small espeak-ng corpus.
  demo          the default jobs' data: that corpus tokenized (with acoustic
                tokens and a held-out split for S2A).
  tfds_builder  a TFDS builder (`tfds build`) into ArrayRecord.
  synthetic     random token shards in the real format (tests, benchmarks).
"""
