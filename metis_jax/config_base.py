"""Every knob of metis_jax, with its default and what it trades off.

Experiment files in `configs/` start from `get_config()` and override what
they change; the command line overrides those (`--config.model.num_layers=4`).
A key that is not declared here is an error, both in a config file and on the
command line, so a typo never silently does nothing.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The masked generative transformer: stage 1 (SSL tokens) or S2A (acoustic tokens)."""
  c = ml_collections.ConfigDict()
  # Which model: 'metis' (stage 1: SSL tokens from a prompt and conditions) or
  # 's2a' (acoustic codec tokens, layer by layer, from SSL tokens).
  c.kind = "metis"
  # Vocabulary of the generated tokens: SSL codes (8192) for stage 1, the
  # acoustic codebook size (1024) for S2A.
  c.vocab_size = 8192
  # Transformer width H. The released models use 1536.
  c.hidden_size = 1536
  # Number of transformer blocks.
  c.num_layers = 16
  # Attention heads; head_dim = hidden_size // num_heads (96 at the base size).
  c.num_heads = 16
  # SwiGLU inner width as a multiple of hidden_size (released: 4).
  c.mlp_ratio = 4
  # RoPE base frequency (rotate-half convention, as in Llama).
  c.rope_theta = 10000.0
  # Epsilon of the adaptive RMSNorm.
  c.norm_eps = 1e-6
  # Phone prefix for TTS (MaskGCT T2S, Metis TTS/Omni): phones are embedded,
  # passed through an MLP and concatenated before the tokens in time.
  c.use_phone_cond = False
  # Rows of the phone embedding table (the released vocabulary uses 363).
  c.phone_vocab_size = 1024
  # Phone id used for padding (never attended to).
  c.phone_pad_id = 1023
  # Width of frame-level conditions (w2v-BERT features 1024 for VC/SE/TSE,
  # lip features 768 for L2S) fed through the adapter; 0 disables the adapter.
  c.cond_feature_dim = 0
  # Multiply the adapter output by a learned scalar initialized to 0 (an exact
  # no-op at the start of fine-tuning). L2S in the release uses no gate.
  c.adapter_gated = True
  # S2A only: number of acoustic codec layers (residual VQ depth) the model
  # embeds: 12 for the full model, 1 for the model that predicts layer 0.
  c.num_quantizers = 12
  # S2A only: vocabulary of the SSL tokens it is conditioned on.
  c.cond_vocab_size = 8192
  # S2A only: whether layer 0 is among the predicted layers (the released
  # 1-layer model) or always given (the full model predicts layers 1..11).
  c.predicts_first_layer = False
  # S2A only: how the one target layer of a batch is drawn: 'linear' (weights
  # proportional to num_quantizers - i, as released), 'cosine' or 'uniform'.
  c.layer_schedule = "linear"
  # Compute dtype of activations and matmuls. bfloat16 on TPU/GPU; float32 for
  # exact parity checks.
  c.dtype = "bfloat16"
  # Dtype of the parameters (the master weights the optimizer updates).
  c.param_dtype = "float32"
  # Stack the blocks with nn.scan: compile time independent of depth, one
  # stacked parameter per weight (leading 'layers' axis). Off gives
  # `layers_0..layers_{N-1}`; both hold the same numbers.
  c.scan_layers = True
  # Rematerialization of each block in the backward pass, from fastest and
  # most memory-hungry to slowest and leanest:
  #   'none'       keep every activation;
  #   'save_dots'  keep matmul outputs, recompute the elementwise rest;
  #   'save_dots_no_batch'  keep only weight matmuls (not attention scores);
  #   'full'       keep only the block inputs, recompute everything.
  c.remat_policy = "none"
  # Implementation of jax.nn.dot_product_attention: '' = the fused cuDNN kernel
  # on a GPU in bf16/fp16 (1.45x the XLA kernel's throughput on an H100), JAX's
  # choice elsewhere; 'xla' forces the portable kernel, 'cudnn' the fused one.
  c.attention_impl = ""
  return c


def masking_config() -> ml_collections.ConfigDict:
  """The masked generative objective, shared by training and decoding."""
  c = ml_collections.ConfigDict()
  # Mask-ratio schedule gamma(t): 'sine' = sin(pi t / 2) (released), 'cosine'
  # = 1 - cos(pi t / 2), 'linear' = t.
  c.schedule = "sine"
  # Lower clamp of the training mask ratio (0.2 for stage 1, 0 for S2A).
  c.min_mask_ratio = 0.2
  # Prompt prefix length per sample is drawn from
  # [min(T // prompt_min_divisor, prompt_min_tokens), prompt_max_fraction * T).
  c.prompt_min_divisor = 4
  c.prompt_min_tokens = 5
  c.prompt_max_fraction = 0.4
  # Probability (per sample) of training without a prompt: the unconditional
  # branch that classifier-free guidance needs.
  c.prompt_drop_prob = 0.15
  return c


def s2a_masking_config() -> ml_collections.ConfigDict:
  """`masking_config()` with the released S2A rules (spec section 7).

  The mask ratio is sin(pi t / 2) with no lower clamp, and the prompt is
  drawn from [min(T // 4, 5), T // 2) (0 with probability 0.15). S2A
  configs set `config.masking = s2a_masking_config()`.
  """
  c = masking_config()
  c.min_mask_ratio = 0.0
  c.prompt_max_fraction = 0.5
  return c


def decode_config() -> ml_collections.ConfigDict:
  """MaskGIT-style iterative decoding; defaults are the reference's TTS ones."""
  c = ml_collections.ConfigDict()
  # Number of decoding steps (each one forward pass, two batches with CFG).
  c.steps = 25
  # Classifier-free guidance scale w (0 disables the unconditional branch).
  c.cfg = 2.5
  # Mix of the std-rescaled guided hidden state (0 = plain CFG).
  c.rescale_cfg = 0.75
  # Sampling temperature at t = 1, annealed linearly to 0; 0 samples greedily.
  c.temperature = 0.9
  # Top-k filter as a fraction of the vocabulary: k = ceil(ratio * V).
  c.top_k_ratio = 0.02
  # Scale of the Gumbel noise added to confidences (annealed by t); 0 re-masks
  # purely by probability.
  c.confidence_noise = 1.0
  # S2A: decoding steps per codec layer (the released full model: 40 for
  # layer 0, 16 for layer 1, 1 for each finer layer).
  c.s2a_steps = (40, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
  # S2A: guidance scale, rescale mix and sampling temperature.
  c.s2a_cfg = 2.5
  c.s2a_rescale_cfg = 0.75
  c.s2a_temperature = 1.5
  return c


def train_config() -> ml_collections.ConfigDict:
  """The pre-training loop: batch, schedule, optimizer, numerics."""
  c = ml_collections.ConfigDict()
  # Optimizer steps of the whole run (the schedule decays to its end value
  # here). Resuming continues until this step.
  c.steps = 400_000
  # Sequences per optimizer step, summed over all devices and accumulation
  # micro-steps. Must divide evenly by the data-parallel size (data x fsdp,
  # ICI x DCN) times grad_accum_steps.
  c.global_batch_size = 256
  # Tokens per training sequence (the crop length; 50 tokens per second of
  # audio). Longer utterances are cropped, shorter ones padded. Attention cost
  # grows with its square; memory of activations linearly.
  c.seq_length = 1024
  # Split each batch into this many micro-batches whose gradients are summed
  # before one optimizer update: the same update as one big batch (the loss
  # is normalized by the total number of scored tokens), for a memory cost of
  # one micro-batch, at the price of less overlap of compute and collectives.
  c.grad_accum_steps = 1
  # Peak learning rate, reached at the end of the warmup.
  c.learning_rate = 1e-4
  # Linear warmup from 0 to learning_rate over this many steps.
  c.warmup_steps = 2_000
  # Decay after the warmup, to end_learning_rate_ratio * learning_rate at
  # `steps`: 'cosine', 'linear', or 'constant' (no decay).
  c.decay = "cosine"
  c.end_learning_rate_ratio = 0.1
  # AdamW moments. b2 = 0.95 (rather than 0.999) adapts faster to gradient
  # scale changes, the usual guard against loss spikes at scale.
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.adam_eps = 1e-8
  # Decoupled weight decay (multiplied by the learning rate, as in AdamW) on
  # matmul kernels only: biases, norm gains, embeddings and scalar gates are
  # not decayed (see optimizer.weight_decay_mask).
  c.weight_decay = 0.01
  # Clip the global gradient norm to this value (0 disables clipping).
  c.grad_clip_norm = 1.0
  # Skip an update whose loss or gradient norm is NaN/Inf: parameters and
  # optimizer state stay unchanged and `state.skipped_steps` counts it. Off
  # lets a non-finite update through (and poisons the weights).
  c.skip_nonfinite = True
  # Train on a synthetic, deterministic token source instead of the corpus in
  # `config.data` (smoke tests, benchmarks, the laptop demo). Each sequence
  # is a run-length pattern like SSL tokens (random ids repeated 1-6 times,
  # random length), so masked tokens are often predictable from their
  # neighbours and the loss falls.
  c.synthetic_data = False
  # Debug only: the update of this step (counted from 1) gets NaN gradients,
  # to exercise the non-finite guard. -1 never.
  c.inject_nan_at_step = -1
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """The device mesh and the logical-to-mesh axis rules.

  The mesh has axes (data, fsdp, tensor). Sizes inside a slice (ICI, fast
  links) and across slices (DCN, data-center network) are separate; the mesh
  axis size is their product. One ICI size and one DCN size may be -1, which
  takes whatever devices (slices) are left.
  """
  c = ml_collections.ConfigDict()
  # Pure data parallelism: each replica holds all weights. Cheapest
  # communication (one gradient all-reduce per step); memory-hungry.
  c.data = 1
  # Fully sharded data parallelism (ZeRO-3): batch *and* weights/optimizer
  # state split; weights are all-gathered layer by layer. The default, since
  # a 0.7B model with fp32 Adam (16 bytes per parameter) fits comfortably once
  # sharded and needs no model-parallel code paths.
  c.fsdp = -1
  # Tensor (Megatron) parallelism over heads / MLP width / vocabulary: for
  # models too wide for fsdp alone; costs activation collectives every layer.
  c.tensor = 1
  # Across slices (multi-slice TPU or several GPU nodes over DCN): data
  # parallelism is the only thing DCN is fast enough for; -1 = one per slice.
  c.dcn_data = -1
  c.dcn_fsdp = 1
  c.dcn_tensor = 1
  # Allow a mesh axis to take only part of a physical TPU torus axis (needed
  # for some shapes, e.g. tensor = 2 on a 4x4x4 slice); may cost bandwidth.
  c.allow_split_physical_axes = False
  # (logical axis name, mesh axis | tuple of mesh axes | None). Parameters:
  # `embed` over fsdp (ZeRO-3 style), the wide axes (`mlp`, `heads`, `vocab`)
  # over tensor. Activations: the batch over data x fsdp, the wide feature
  # axes over tensor; sequence length and head_dim are never split.
  c.logical_axis_rules = (
      ("activation_batch", ("data", "fsdp")),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", "tensor"),
      ("activation_kv", None),
      ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("cond_features", None),
      ("norm", None),
      ("layers", None),
      ("conv_in", None),
      ("conv_out", None),
      ("codebook", None),
      ("quantizer", None),
  )
  return c


def checkpoint_config() -> ml_collections.ConfigDict:
  """Orbax checkpoints under `<workdir>/checkpoints` and auto-resume."""
  c = ml_collections.ConfigDict()
  # Save and restore checkpoints at all (off: every start is a fresh run).
  c.enabled = True
  # Save every this many steps (and at the last step, and on SIGTERM).
  # Smaller loses less work on a crash; each save costs a device-to-host copy
  # of the state (about 12 bytes per parameter) and storage bandwidth.
  c.every_steps = 1000
  # Keep the newest this many checkpoints (older ones are deleted).
  c.keep = 3
  # Also keep every checkpoint whose step is a multiple of this forever
  # (for later evaluation); 0 keeps none beyond `keep`.
  c.keep_period = 0
  # Write checkpoints in a background thread, so training continues while
  # the bytes go to storage (the copy off the devices still blocks briefly).
  c.async_save = True
  # On SIGTERM (preemption, scancel, Ctrl-C via kill), save at the current
  # step and exit cleanly.
  c.save_on_preemption = True
  return c


def logging_config() -> ml_collections.ConfigDict:
  """Metrics, TensorBoard and profiling (process 0 only writes)."""
  c = ml_collections.ConfigDict()
  # Write metrics and print the progress line every this many steps. The host
  # reads each step's metrics one step late, so logging never stalls the
  # device.
  c.log_every_steps = 10
  # Write TensorBoard event files under `<workdir>/tensorboard`.
  c.tensorboard = True
  # Capture a jax.profiler trace (to `<workdir>/profile`) of
  # `profile_num_steps` steps starting at `profile_start_step`; 0 steps = off.
  # Start after compilation and warmup (step >= 3) for a representative trace.
  c.profile_start_step = 5
  c.profile_num_steps = 0
  # Peak bf16 FLOP/s of one device for the MFU figure; 0 looks the device kind
  # up in metrics.PEAK_BF16_FLOPS.
  c.peak_flops_per_device = 0.0
  return c


def data_config() -> ml_collections.ConfigDict:
  """Corpora, the tokenization job and the Grain input pipeline (metis_jax/data).

  The batch size and the crop length come from `train.global_batch_size` and
  `train.seq_length`.
  """
  c = ml_collections.ConfigDict()
  # --- Reading raw corpora (tokenization job, k-means fit, TFDS build). ---
  # Corpus layout: 'auto' ('emilia' if the input holds .tar files, else
  # 'dir'); 'dir' (wav/flac/mp3/ogg with optional .txt/.normalized.txt/.json
  # beside each); 'emilia' (WebDataset tars of <key>.mp3 + <key>.json);
  # 'librilight' (flac + json); 'libritts' (wav + .normalized.txt).
  c.layout = "auto"
  # Language tag for corpora that do not say ('' = unknown, 'und' in the
  # manifest).
  c.default_language = ""
  # Keep utterances of min_duration..max_duration seconds (metadata and
  # decoded audio). Metis trains on 3-30 s clips; longer files are skipped,
  # not split. A lower minimum keeps more short data.
  c.min_duration = 1.0
  c.max_duration = 30.0
  # Keep utterances with at least this DNSMOS (Emilia metadata; 3.0 is
  # Emilia's own cut). Utterances without a score are kept; 0 disables.
  c.min_dnsmos = 0.0
  # Audio whose peak stays below this level (dBFS) is 'silent' and skipped.
  c.silence_threshold_db = -60.0
  # --- Tokenization job (python -m metis_jax.data.tokenize). ---
  # Directory of the saved SSL tokenizer (tokenizer.json names its type:
  # 'kmeans' from fit_kmeans, or the w2v-BERT + semantic-codec one).
  c.tokenizer_dir = ""
  # Optional acoustic codec for the tokenization job: its released encoder and
  # decoder safetensors (Amphion layout). When set, records also carry the
  # 24 kHz codec tokens [T, 12] that S2A trains on.
  c.acoustic_codec_encoder = ""
  c.acoustic_codec_decoder = ""
  # k of the k-means tokenizer (its vocabulary; must equal model.vocab_size
  # to train on its tokens). More clusters keep more detail, need more data.
  c.kmeans_clusters = 8192
  # Lloyd iterations of the k-means fit, and the most 50 Hz feature frames it
  # uses (sampled from the corpus): more = better centroids, slower fit.
  c.kmeans_iterations = 25
  c.kmeans_max_frames = 500_000
  # Audio files per output shard in directory layouts (a tar is always one
  # shard). Smaller = finer-grained resume and more files.
  c.files_per_shard = 512
  # Seconds of audio per tokenizer call over all local devices: larger is
  # faster until device memory runs out.
  c.tokenize_batch_seconds = 320.0
  # Utterances are zero-padded to a multiple of this many seconds, so the
  # jitted tokenizer compiles once per bucket; larger = fewer compilations,
  # more wasted compute on padding.
  c.tokenize_bucket_seconds = 2.0
  # Threads decoding and resampling audio while the devices tokenize.
  c.decode_threads = 4
  # --- Training input pipeline (metis_jax.data.pipeline, Grain). ---
  # Tokenized corpora: directories of shards written by the job, glob
  # patterns, or 'tfds:NAME[:SPLIT]' (TFDS ArrayRecord datasets under
  # tfds_data_dir).
  c.train_sources = ()
  # With no `train_sources`: synthesize the espeak-ng demo corpus, fit a
  # k-means tokenizer of `kmeans_clusters` codes and tokenize it, all under
  # `<workdir>/demo_data` (reused on resume), then train on it. This is the
  # README's laptop job; real runs set `train_sources`.
  c.demo_corpus = False
  # Mixture weights of train_sources (empty = equal): records are drawn in
  # these proportions whatever the corpus sizes.
  c.train_weights = ()
  # data_dir of TFDS sources ('' = the TFDS default).
  c.tfds_data_dir = ""
  # Sequences shorter than this many tokens (after the random crop to
  # train.seq_length) are dropped; 50 tokens = 1 s.
  c.min_length = 50
  # Padded lengths: each batch is padded to the smallest bucket that holds
  # its longest sequence. Few buckets = few compilations; more buckets = less
  # padding. The last must be train.seq_length; empty = 4 equal steps.
  c.bucket_lengths = ()
  # Sequences are sorted by length within windows of this many batches before
  # batching: larger windows waste less on padding, but a restored iterator
  # re-reads up to one window.
  c.bucket_window = 32
  # Pack several sequences per row up to train.seq_length instead of
  # bucketing: one fixed shape, little padding, and the batch gains
  # `segment_ids` / `positions` (the model must mask attention by segment).
  c.packing = False
  # Passes over the data; 0 = repeat forever (training).
  c.num_epochs = 0
  # Seed of the global shuffle, the crops and the batch order.
  c.seed = 0
  # Grain worker processes per host decoding records (0 = in the main
  # process). More workers help when decoding is the bottleneck; each costs
  # memory and start-up time.
  c.num_workers = 2
  # Elements each worker prepares ahead.
  c.worker_buffer_size = 16
  return c


def get_config() -> ml_collections.ConfigDict:
  """All defaults. Experiment files call this and override fields."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.masking = masking_config()
  config.decode = decode_config()
  config.train = train_config()
  config.mesh = mesh_config()
  config.checkpoint = checkpoint_config()
  config.logging = logging_config()
  config.data = data_config()
  # Seed of parameter initialization and of the masking/decoding PRNG.
  config.seed = 0
  return config
