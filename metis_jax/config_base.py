"""Every knob of metis_jax, with its default and what it trades off.

Experiment files in `configs/` start from `get_config()` and override what
they change; the command line overrides those (`--config.model.num_layers=4`).
A key that is not declared here is an error, both in a config file and on the
command line, so a typo never silently does nothing.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The stage-1 Metis model (bidirectional masked generative transformer)."""
  c = ml_collections.ConfigDict()
  # Vocabulary of SSL tokens (the semantic codec's codebook size).
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
  # Implementation of jax.nn.dot_product_attention: '' lets JAX choose, 'xla'
  # forces the portable kernel, 'cudnn' the fused GPU kernel (bf16/fp16 only).
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
  return c


def get_config() -> ml_collections.ConfigDict:
  """All defaults. Experiment files call this and override fields."""
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.masking = masking_config()
  config.decode = decode_config()
  # Seed of parameter initialization and of the masking/decoding PRNG.
  config.seed = 0
  return config
