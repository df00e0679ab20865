"""Every knob of metis_jax, with its default and what it trades off.

Experiment files in `configs/` start from one of the run builders below and
override what they change; the command line overrides those
(`--config.model.num_layers=4`). A key that is not declared here is an
error, both in a config file and on the command line, so a typo never
silently does nothing.

Run builders (`config.model.kind` tells the trainer which objective runs):
  get_config()              stage 1 ('metis') and S2A ('s2a'): model, masking,
                            decode, train, mesh, checkpoint, logging, data, seed.
  acoustic_codec_config()   'acoustic_codec': acoustic_codec_model, _train,
                            audio_data_config, mesh, checkpoint, logging, seed.
  semantic_codec_config()   'semantic_codec': the same plus `features`.
  finetune_run_config()     'metis_finetune': get_config() plus `finetune` and
                            `features` (fine-tuning from a frozen base).
The run sections (mesh, checkpoint, logging, seed) are shared by all of them.
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
  # Frame feature the adapter reads: 'w2v_bert' (normalized w2v-BERT 2.0 layer 17,
  # the released fine-tunes) or 'cheap' (160-d log-mel pairs at 50 Hz of the tiny
  # demo fine-tunes); see frontend/condition_features.py.
  c.cond_feature = "w2v_bert"
  # LoRA (W + lora_alpha / lora_rank * B A) on the backbone's linear maps, for
  # fine-tuning; 0 = none. Released SE/TSE: r 32, alpha 64; VC: r 16, alpha 32.
  c.lora_rank = 0
  # The update is scaled by lora_alpha / lora_rank.
  c.lora_alpha = 0.0
  # Dropout on the LoRA input while training (released: 0.01).
  c.lora_dropout = 0.0
  # Adapted maps: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
  c.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
  # Attention kernel: '' = the fused cuDNN kernel on a GPU in bf16/fp16 (1.45x the
  # XLA kernel's throughput on an H100), Pallas splash attention on a TPU, XLA
  # elsewhere; 'xla', 'cudnn', 'splash' force one. The fused kernels take rows
  # left-packed (valid slots first, nn/packing.py), with per-row lengths.
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
  # A run whose last updates were all skipped, more than this many in a row,
  # has diverged: it ends with a non-zero exit status (checkpointing.final_status).
  # 0 disables the check.
  c.max_consecutive_skips = 100
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
      ("lora_rank", None),
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
  # Seconds a process waits for the others' verdict on a checkpoint while
  # restoring (each exchange) before the restore fails with the reason.
  c.restore_timeout_s = 600.0
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
  # Padded lengths: each batch is padded to the bucket a schedule assigns it
  # (from a sample of the data's lengths, the seed and the step: the same on
  # every host, so no per-step collective); a longer row is cropped to it.
  # Few buckets = few compilations; more buckets = less padding. The last must
  # be train.seq_length; empty = 4 equal steps.
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


def _with_run_sections(config: ml_collections.ConfigDict,
                       data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the sections every run has: mesh, checkpoint, logging, its `data` and the seed."""
  config.mesh = mesh_config()
  config.checkpoint = checkpoint_config()
  config.logging = logging_config()
  config.data = data
  # Seed of parameter initialization and of the run's PRNG (masks, decoding,
  # quantizer dropout, dead-code restarts).
  config.seed = 0
  return config


def get_config() -> ml_collections.ConfigDict:
  """All defaults of a stage-1 / S2A run. Experiment files call this and override fields."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.masking = masking_config()
  config.decode = decode_config()
  config.train = train_config()
  return _with_run_sections(config, data_config())


def finetune_config() -> ml_collections.ConfigDict:
  """A fine-tune of stage-1 Metis from a frozen base (`model.kind = 'metis_finetune'`).

  See `metis_jax/training/finetune_objective.py`. Task batches are made on the
  fly from one clean tokenized corpus (`data.train_sources`, shards tokenized
  with `--record_sources`; or the demo corpus with `data.demo_corpus`), see
  `metis_jax/data/tasks.py` for what each field below changes.
  """
  c = ml_collections.ConfigDict()
  # 'se', 'tse', 'vc', 'tts', 'l2s' or 'omni' (a weighted mix of `omni_tasks`).
  c.task = "se"
  # What trains (`training/trainable.py` groups joined by '+', 'full', or
  # 're:<regex>'): 'lora+adapter' (SE/TSE/VC), 'lora+phones' (TTS),
  # 'adapter', 'full' (L2S, Omni). Everything else is frozen: no gradient and
  # no optimizer state.
  c.trainable = "lora+adapter"
  # The frozen base: a metis_jax training workdir (its newest checkpoint), a
  # folder from `python -m metis_jax.convert`, or a released stage-1
  # .safetensors file (Metis base; MaskGCT T2S for TTS). Its sizes must equal
  # `model`'s. Its content hash goes into every checkpoint; a resumed run with
  # another base is refused.
  c.base = ""
  # Probability of dropping a row's prompt (and phones) in a batch: trains the
  # unconditional branch of classifier-free guidance (VC, TTS, L2S decode with CFG).
  c.prompt_drop_prob = 0.15
  # Phone rows are padded to this width (TTS, Omni), so the step compiles once.
  c.phone_length = 512
  # Write `<workdir>/export/` at the end (a decode folder + the released layout).
  c.export = True
  # Task data (`data.tasks.TaskOptions`; max_length is train.seq_length).
  # Corpus root of the records' source paths ('' = the shards' manifest input).
  c.audio_root = ""
  # SE noise and room-response folders (DNS-Challenge / MUSAN / WHAM!-style trees).
  c.noise_dirs = ()
  c.rir_dirs = ()
  # L2S: visual features beside the audio ('') or under this folder (mirroring the corpus).
  c.visual_dir = ""
  c.visual_suffix = ".npy"
  # Targets shorter than this many tokens are skipped (counted).
  c.min_tokens = 25
  # (min, max) prompt tokens drawn per example (TSE, VC, L2S).
  c.prompt_tokens = (50, 150)
  # SE: SNR range (dB) and probability of reverberating the clean speech.
  c.snr_db = (-5.0, 20.0)
  c.reverb_prob = 0.3
  # TSE: interferer SIR range (dB).
  c.sir_db = (-5.0, 5.0)
  # VC: pitch-shift magnitude (semitones) and formant factor of the perturbed source.
  c.vc_semitones = (2.0, 5.0)
  c.vc_formant = 1.15
  # Omni: the mixed tasks and their weights (empty = equal).
  c.omni_tasks = ("se", "tse", "vc", "tts")
  c.omni_weights = ()
  # Train on all but the demo's held-out utterances (set by the demo corpus).
  c.demo_heldout = False
  return c


def finetune_run_config() -> ml_collections.ConfigDict:
  """All defaults of a fine-tune run: `get_config()` plus `finetune` and `features`.

  `features` (the frozen w2v-BERT 2.0 encoder, as for the semantic codec) is
  read when `model.cond_feature = 'w2v_bert'`: the condition features are
  computed inside the step from the batch's 16 kHz audio.
  """
  config = get_config()
  config.model.kind = "metis_finetune"
  config.finetune = finetune_config()
  config.features = features_config()
  return config


# ----------------------------------------------------------------------------- codecs


def acoustic_codec_model_config() -> ml_collections.ConfigDict:
  """The acoustic codec (models/acoustic_codec.py); defaults are the released model.

  Every field but `kind` is a field of `AcousticCodecConfig`, with its default
  (tests/test_config.py checks they agree).
  """
  c = ml_collections.ConfigDict()
  # Tells the trainer this is an acoustic-codec run (a GAN: generator and
  # discriminators, two optimizers).
  c.kind = "acoustic_codec"
  # DAC encoder: width of the first convolution (doubled by every block), the
  # strides of its blocks (their product is the hop), the latent width, and a
  # tanh on the latent (off in the release).
  c.encoder_dim = 96
  c.up_ratios = (3, 4, 5, 8)
  c.latent_dim = 256
  c.use_tanh = False
  # Residual VQ: layers, codes per layer, factorized (projected) code width,
  # the probability of training with a random number of layers (quantizer
  # dropout), and the weights of the commitment and codebook losses.
  c.num_quantizers = 12
  c.codebook_size = 1024
  c.codebook_dim = 8
  c.quantizer_dropout = 0.5
  c.commitment = 0.25
  c.codebook_loss_weight = 1.0
  # Vocos decoder: width, ConvNeXt inner width, blocks; iSTFT head.
  c.vocos_dim = 512
  c.vocos_intermediate_dim = 4096
  c.vocos_num_layers = 30
  c.n_fft = 1920
  c.hop_size = 480
  c.sample_rate = 24000
  # Weight-normalized convolutions (g, v) as in the original, or plain kernels.
  c.weight_norm = False
  # Stack the Vocos blocks with nn.scan (compile time independent of depth).
  c.scan_layers = True
  # Compute and parameter dtypes.
  c.dtype = "float32"
  c.param_dtype = "float32"
  return c


def acoustic_codec_train_config() -> ml_collections.ConfigDict:
  """GAN training of the acoustic codec (no recipe is released; Vocos/DAC defaults, spec section 3)."""
  c = ml_collections.ConfigDict()
  # Generator (and discriminator) updates of the whole run.
  c.steps = 400_000
  # Crops per step over all devices; divisible by the data-parallel size.
  c.global_batch_size = 16
  # Seconds per training crop (a multiple of the hop is taken).
  c.crop_seconds = 1.0
  # One optimizer per network, both from these fields (training/optimizer.py:
  # warmup, then `decay` to end_learning_rate_ratio * learning_rate at `steps`).
  c.learning_rate = 1e-4
  c.warmup_steps = 0
  c.decay = "cosine"
  c.end_learning_rate_ratio = 0.1
  c.adam_b1 = 0.5
  c.adam_b2 = 0.9
  c.adam_eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip_norm = 1000.0
  # Skip an update whose loss or gradient norm is NaN/Inf (counted per network).
  c.skip_nonfinite = True
  # More skipped updates than this in a row at the end: the run failed (0 = no check).
  c.max_consecutive_skips = 100
  # Debug only: the generator update of this step (from 1) gets NaN gradients.
  c.inject_nan_at_step = -1
  # Loss weights.
  c.mel_weight = 10.0
  c.adv_weight = 2.0
  c.feature_matching_weight = 2.0
  c.vq_weight = 1.0
  # Multi-scale mel L1 (DAC): window lengths and mel bins per scale.
  c.mel_windows = (32, 64, 128, 256, 512, 1024, 2048)
  c.mel_bins = (5, 10, 20, 40, 80, 160, 320)
  # Discriminators: HiFi-GAN multi-period and multi-resolution spectrogram.
  c.mpd_periods = (2, 3, 5, 7, 11)
  c.mrd_ffts = (128, 256, 512, 1024, 2048)
  # Channels of the discriminators (the original Vocos sizes are 32..1024).
  c.disc_channels = 32
  c.disc_max_channels = 1024
  # Generator-only steps before the adversarial and feature-matching terms
  # join the generator loss (the discriminators train from the start).
  c.disc_start_step = 0
  # RVQ codebooks at the start: 'data' draws each layer's rows from the first
  # batch's projected latents (training/codec_step.py says why: with N(0, 1)
  # rows, 300x larger than the fresh encoder's latents, the RVQ collapsed to
  # 1-2 codes per layer); 'random' keeps the N(0, 1) init (DAC).
  c.codebook_init = "data"
  # Dead-code restarts of the RVQ codebooks (see semantic_codec_train_config);
  # off for the acoustic codec by default, as in DAC.
  c.restart_every = 0
  c.restart_threshold = 1.0
  return c


def semantic_codec_model_config() -> ml_collections.ConfigDict:
  """The semantic codec (models/semantic_codec.py, RepCodec-style); defaults are the released model.

  Every field but `kind` is a field of `SemanticCodecConfig`, with its default.
  """
  c = ml_collections.ConfigDict()
  # Tells the trainer this is a semantic-codec run.
  c.kind = "semantic_codec"
  # Codes (the SSL vocabulary Metis models), input feature width (w2v-BERT
  # 2.0: 1024), factorized code width, residual layers.
  c.codebook_size = 8192
  c.hidden_size = 1024
  c.codebook_dim = 8
  c.num_quantizers = 1
  # Vocos encoder and decoder: width, ConvNeXt inner width, blocks (each).
  c.vocos_dim = 384
  c.vocos_intermediate_dim = 2048
  c.vocos_num_layers = 12
  # VQ loss weights.
  c.commitment = 0.15
  c.codebook_loss_weight = 1.0
  # Weight-normalized projections (g, v) as in the original, or plain kernels.
  c.weight_norm = False
  # Stack the Vocos blocks with nn.scan.
  c.scan_layers = False
  # Compute and parameter dtypes.
  c.dtype = "float32"
  c.param_dtype = "float32"
  return c


def semantic_codec_train_config() -> ml_collections.ConfigDict:
  """Training of the semantic codec (the original trainer is not released: these are ours)."""
  c = ml_collections.ConfigDict()
  c.steps = 100_000
  # Crops per step over all devices; divisible by the data-parallel size.
  c.global_batch_size = 32
  # Feature frames per training crop (50 per second; audio crops are cut to
  # give exactly this many w2v-BERT frames).
  c.crop_frames = 250
  # training/optimizer.py: warmup, then `decay` to end_learning_rate_ratio *
  # learning_rate at `steps`.
  c.learning_rate = 1e-4
  c.warmup_steps = 1000
  c.decay = "cosine"
  c.end_learning_rate_ratio = 0.1
  c.adam_b1 = 0.9
  c.adam_b2 = 0.99
  c.adam_eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  # Skip an update whose loss or gradient norm is NaN/Inf (counted).
  c.skip_nonfinite = True
  # More skipped updates than this in a row at the end: the run failed (0 = no check).
  c.max_consecutive_skips = 100
  # Debug only: the update of this step (from 1) gets NaN gradients.
  c.inject_nan_at_step = -1
  # Reconstruction = l1_weight * L1 + mse_weight * MSE to the input features
  # (our decision; the original forward returns only the decoder output).
  c.l1_weight = 1.0
  c.mse_weight = 1.0
  # RVQ codebooks at the start: 'random' (N(0, 1), the RepCodec init) or
  # 'data' (drawn from the first batch's projected latents, as the acoustic
  # codec does). 'random' here: drawn codebooks made this codec's VQ losses
  # diverge in tiny runs, and its restarts keep the codes alive.
  c.codebook_init = "random"
  # Dead-code restarts: every `restart_every` steps, codes used fewer than
  # `restart_threshold` times since the last restart are re-drawn from random
  # projected encoder outputs of the current batch. 0 disables.
  c.restart_every = 200
  c.restart_threshold = 1.0
  return c


def audio_data_config() -> ml_collections.ConfigDict:
  """Raw audio for codec training (metis_jax/data/waveform_pipeline.py).

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
  #   (training/codec_data.synthetic_features), for quick checks of the codec itself.
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


CODEC_KINDS = ("acoustic_codec", "semantic_codec")


def acoustic_codec_config() -> ml_collections.ConfigDict:
  """All defaults of an acoustic-codec run (the released size)."""
  config = ml_collections.ConfigDict()
  config.model = acoustic_codec_model_config()
  config.train = acoustic_codec_train_config()
  return _with_run_sections(config, audio_data_config())


def semantic_codec_config() -> ml_collections.ConfigDict:
  """All defaults of a semantic-codec run (the released size, features from w2v-BERT 2.0)."""
  config = ml_collections.ConfigDict()
  config.model = semantic_codec_model_config()
  config.train = semantic_codec_train_config()
  config = _with_run_sections(config, audio_data_config())
  config.features = features_config()
  return config
