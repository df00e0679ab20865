r"""metis_jax against the original PyTorch code, side by side in one run: time ratios and peak memory.

  python benchmarks/compare_reference.py                                  # metis_jax alone
  python benchmarks/compare_reference.py --reference_src /tmp/maskgct-0.0.19 \
      --reference_python /tmp/venv/bin/python                             # both sides
  python benchmarks/compare_reference.py --rows t2s_decode_tiny_5s,t2s_train_tiny --rounds 5

The reference is the `maskgct` sdist from PyPI (`pip download --no-deps --no-binary :all:
maskgct`, unpacked; `--reference_src` is the folder holding its `maskgct/` package); its
modules are loaded from their files without running the package `__init__`s (which pull
the phonemizer and a logger). It needs torch, einops and transformers 4.41 (the version
its `llama_nar.py` was written against) in the interpreter `--reference_python`; this
package never imports torch.

Every measurement is a fresh subprocess (`--_worker`): it builds the row's model with
random weights of the same sizes, float32, 2 threads (torch.set_num_threads(2); XLA's
CPU pool has one thread per core, and this machine has 2), runs the work once to compile / warm up, times it
`--inner` times and reports the median and the process's peak RSS. OpenMP threads wait
passively (OMP_WAIT_POLICY=PASSIVE unless set): with the default spinning, torch's 2
threads on a machine shared with other processes ran 20x slower (a 2-layer forward: 1.4 s
against 0.06 s), which says nothing about the code. The parent alternates
the sides (metis_jax, original, metis_jax, original, ... for `--rounds` rounds), so load
from other processes falls on both, and reports per side the median over rounds; the
ratio is original time / metis_jax time (> 1: metis_jax is faster). Peak RSS is the
largest over that side's rounds (each side in its own process, so the two never share
memory).

Each row's work in GFLOP is its minimum, `aot_cost`'s analytical count (matmuls and
attention, the head only where needed), or for the loop-free codec programs the compiled
program's count; GFLOP/s is that over each side's time. A first worker measures the
machine's float32 matmul peak (XLA, 2048^3, fastest of 8 runs), and `ceiling` is the ratio a
program doing the row's work at that peak would reach against the original: a target
above the ceiling cannot be met on this machine without doing less work.

Rows (batch 1, 3 s prompt = 150 tokens, 100 phones where the model takes phones):
  t2s_decode_tiny_5s     T2S tiny (128 wide, 2 layers, 4 heads, 1024 codes), 5 s target,
                         25 steps, CFG 2.5
  t2s_decode_tiny_10s    the same, 10 s target
  t2s_forward_base       T2S base (1536/16/16, 8192 codes), one forward: 100 phones +
                         150 prompt + 250 target tokens, logits of the target
  t2s_decode_base_step   T2S base, 10 s target, CFG 2.5: `--base_steps` decoding steps,
                         time per step
  s2a_decode             S2A 512 wide / 8 layers / 8 heads, 12 codec layers, 10 s target,
                         steps [40, 16, 1 x 10], CFG 2.5; every layer's steps capped at
                         `--s2a_max_steps` and the time scaled to the full schedule
  t2s_train_tiny         T2S tiny train step (forward, loss on masked positions, backward,
                         AdamW), B 4 x T 500
  t2s_train_tiny_restart the same in a restarted run: its programs loaded from the
                         persistent compilation cache (`python -m metis_jax.train`'s default),
                         which an unreported first process fills; the original has no
                         compile, so its side is t2s_train_tiny's again
  t2s_train_base         T2S base train step, B 1 x T 500, no remat on either side; peak RSS
  acoustic_encode        acoustic codec (released sizes) encode 10 s (encoder + RVQ)
  acoustic_decode        acoustic codec decode 10 s (codes -> waveform)
  semantic_quantize      semantic codec quantize 10 s (500 w2v-BERT frames -> tokens)
  tiny_decode_b8         T2S tiny decode 10 s at batch 8: generated tokens/s, shown against
                         t2s_decode_tiny_10s's batch-1 figure (throughput gain)

The original's training step has no trainer in the sdist; it is written here the way its
`loss_t` outputs are meant to be used: cross-entropy over `final_mask` positions,
backward, torch.optim.AdamW. The machine may be busy: the interleaving makes the ratios
comparable, not the absolute times.
"""

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = 150
PHONES = 100
CFG = 2.5
TOKENS_PER_SECOND = 50
S2A_STEPS = (40, 16) + (1,) * 10

ROWS = ("t2s_decode_tiny_5s", "t2s_decode_tiny_10s", "t2s_forward_base", "t2s_decode_base_step",
        "s2a_decode", "t2s_train_tiny", "t2s_train_tiny_restart", "t2s_train_base",
        "acoustic_encode", "acoustic_decode", "semantic_quantize", "tiny_decode_b8")
PEAK = "matmul_peak"  # the worker kind measuring the machine's matmul rate
TINY = dict(hidden=128, layers=2, heads=4, vocab=1024)
BASE = dict(hidden=1536, layers=16, heads=16, vocab=8192)


def row_spec(row: str, args) -> dict:
  """What a row runs: size, batch, target tokens, steps, and how to scale the time."""
  if row.startswith("t2s_decode_tiny"):
    target = 250 if row.endswith("5s") else 500
    return dict(kind="t2s_decode", size=TINY, batch=1, target=target, steps=25, scale=1.0)
  if row == "tiny_decode_b8":
    return dict(kind="t2s_decode", size=TINY, batch=8, target=500, steps=25, scale=1.0)
  if row == "t2s_forward_base":
    return dict(kind="t2s_forward", size=BASE, batch=1, target=250)
  if row == "t2s_decode_base_step":
    return dict(kind="t2s_decode", size=BASE, batch=1, target=500, steps=args.base_steps,
                scale=1.0 / args.base_steps)
  if row == "s2a_decode":
    steps = tuple(min(s, args.s2a_max_steps) for s in S2A_STEPS)
    return dict(kind="s2a_decode", batch=1, target=500, steps=steps,
                scale=sum(S2A_STEPS) / sum(steps))
  if row in ("t2s_train_tiny", "t2s_train_tiny_restart"):
    return dict(kind="t2s_train", size=TINY, batch=4, length=500)
  if row == "t2s_train_base":
    return dict(kind="t2s_train", size=BASE, batch=1, length=500)
  if row in ("acoustic_encode", "acoustic_decode", "semantic_quantize"):
    return dict(kind=row, seconds=10.0)
  raise ValueError(row)


# ----------------------------------------------------------------------------- metis_jax side


def jax_runner(spec: dict, async_cpu: bool = False):
  """A blocking `run()` doing the row's work once with metis_jax."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from metis_jax import config_lib  # pylint: disable=import-outside-toplevel
  from metis_jax.models import metis  # pylint: disable=import-outside-toplevel

  kind = spec["kind"]

  def t2s_config(size, phones, extra=()):
    return config_lib.load_config("tiny" if size is TINY else "metis_base", [
        f"model.use_phone_cond={phones}", "model.dtype=float32", *extra])

  if kind in ("t2s_decode", "t2s_forward"):
    from metis_jax.inference import decoding  # pylint: disable=import-outside-toplevel
    config = t2s_config(spec["size"], True)
    model = metis.MetisModel(metis.MetisConfig.from_config(config.model))
    params = jax.jit(lambda r: metis.init_params(model, r))(jax.random.key(0))
    b, target = spec["batch"], spec["target"]
    prompt = jax.random.randint(jax.random.key(1), (b, PROMPT), 0, config.model.vocab_size)
    phones = jax.random.randint(jax.random.key(3), (b, PHONES), 0, 363)
    if kind == "t2s_decode":
      options = dataclasses.replace(decoding.DecodeOptions.from_config(config.decode),
                                    steps=spec["steps"], cfg=CFG)
      decoder = decoding.MetisDecoder(model, options)
      lengths = (jnp.full((b,), PROMPT), jnp.full((b,), target))
      return lambda: decoder(params, jax.random.key(2), prompt, *lengths, target_len=target,
                             phones=phones, phone_lengths=jnp.full((b,), PHONES)).block_until_ready()

    @jax.jit
    def forward(params, tokens, phones):
      n = tokens.shape[1]
      masked = jnp.arange(n)[None, :] >= PROMPT
      hidden = model.apply({"params": params}, tokens, jnp.broadcast_to(masked, tokens.shape),
                           jnp.ones(tokens.shape, bool), jnp.full((b,), 0.5), phones,
                           jnp.ones(phones.shape, bool), method=metis.MetisModel.hidden_states)
      return model.apply({"params": params}, hidden[:, PROMPT:], method=metis.MetisModel.logits)

    tokens = jax.random.randint(jax.random.key(4), (b, PROMPT + target), 0, config.model.vocab_size)
    return lambda: forward(params, tokens, phones).block_until_ready()

  if kind == "t2s_train":
    # profile_top.py lies beside this script (its folder is on sys.path).
    import profile_top  # pylint: disable=import-outside-toplevel
    from metis_jax.training import host_memory  # pylint: disable=import-outside-toplevel
    if not async_cpu:
      host_memory.run_cpu_programs_inline()  # as `python -m metis_jax.train` does
    # The trainer's step as the training loop runs it (compiled ahead, which also hands the
    # compiler's freed host memory back and keeps CPU step buffers in the heap).
    run, _ = profile_top.train_workload(
        spec["batch"], spec["length"], "tiny" if spec["size"] is TINY else "metis_base",
        ["model.use_phone_cond=False", "model.dtype=float32", "model.remat_policy=none"])
    return run

  if kind == "s2a_decode":
    from metis_jax import config_base  # pylint: disable=import-outside-toplevel
    from metis_jax.inference import s2a_decoding  # pylint: disable=import-outside-toplevel
    from metis_jax.models import s2a  # pylint: disable=import-outside-toplevel
    cfg = config_base.model_config()
    cfg.kind, cfg.vocab_size, cfg.cond_vocab_size = "s2a", 1024, 8192
    cfg.hidden_size, cfg.num_heads, cfg.num_layers = 512, 8, 8
    cfg.num_quantizers, cfg.predicts_first_layer, cfg.dtype = 12, False, "float32"
    model = s2a.S2AModel(s2a.S2AConfig.from_config(cfg))
    params = jax.jit(lambda r: s2a.init_params(model, r))(jax.random.key(0))
    decoder = s2a_decoding.S2ADecoder(model, s2a_decoding.S2ADecodeOptions(steps=spec["steps"], cfg=CFG))
    b, t, key = spec["batch"], spec["target"], jax.random.key(1)
    sem_p = jax.random.randint(key, (b, PROMPT), 0, 8192)
    ac_p = jax.random.randint(key, (b, PROMPT, 12), 0, 1024)
    sem_t = jax.random.randint(key, (b, t), 0, 8192)
    lp, lt = jnp.full((b,), PROMPT), jnp.full((b,), t)
    return lambda: decoder(params, key, sem_p, ac_p, lp, sem_t, lt).block_until_ready()

  rng = np.random.default_rng(0)
  random_params = lambda abstract: jax.tree_util.tree_map(
      lambda x: jnp.asarray((0.02 * rng.standard_normal(x.shape)).astype(np.float32)), abstract)
  if kind.startswith("acoustic"):
    from metis_jax.models import acoustic_codec as ac  # pylint: disable=import-outside-toplevel
    # Per-layer (unstacked) backbone weights, as the original holds them: the same math, but a
    # stacked layout makes the jitted decode copy each layer's 16 MB out of the stack per call
    # (8% of the decode on CPU). The converter gives this layout with scan_layers=False.
    cfg = ac.AcousticCodecConfig(dtype="float32", scan_layers=False)
    model = ac.AcousticCodec(cfg)
    params = random_params(ac.abstract_params(model))
    n = int(spec["seconds"] * cfg.sample_rate) // cfg.hop_size * cfg.hop_size
    if kind == "acoustic_encode":
      wav = jax.random.normal(jax.random.key(0), (1, n)) * 0.1
      fn = jax.jit(lambda p, w: model.apply({"params": p}, w, method=ac.AcousticCodec.encode))
      return compiled_run(fn, params, wav)
    codes = jax.random.randint(jax.random.key(1), (1, n // cfg.hop_size, cfg.num_quantizers), 0,
                               cfg.codebook_size)
    fn = jax.jit(lambda p, c: model.apply({"params": p}, c, method=ac.AcousticCodec.decode))
    return compiled_run(fn, params, codes)
  if kind == "semantic_quantize":
    from metis_jax.models import semantic_codec as sc  # pylint: disable=import-outside-toplevel
    cfg = sc.SemanticCodecConfig(dtype="float32")
    model = sc.SemanticCodec(cfg)
    params = random_params(sc.abstract_params(model))
    feat = jax.random.normal(jax.random.key(0), (1, int(spec["seconds"] * 50), cfg.hidden_size))
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=sc.SemanticCodec.quantize))
    return compiled_run(fn, params, feat)
  raise ValueError(kind)


# ----------------------------------------------------------------------------- work per row


def compiled_run(jitted, *args):
  """A blocking `run()` of `jitted(*args)` compiled once, its program's FLOPs as `run.flops`.

  The FLOPs only for loop-free programs (the codecs with unstacked layers): XLA's
  cost analysis counts a while loop's body once, so a program with a loop gets None.
  """
  import jax  # pylint: disable=import-outside-toplevel
  compiled = jitted.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  looped = any(" while(" in line for line in compiled.as_text().splitlines())
  run = lambda: jax.block_until_ready(compiled(*args))
  run.flops = None if looped else float(cost.get("flops", 0.0)) or None
  return run


def model_flops(row: str, args) -> float | None:
  """The row's FLOPs at the model's minimum, per timed unit (what `seconds` measures).

  `aot_cost`'s analytical count (matmuls and attention; the head only where the
  work needs it): T2S decode = steps x its decode step with phones, prompt, target
  and CFG (the unconditional pass over the target alone); forward = one
  conditional pass and the head on the target; train = 3 x forward with the head
  on the expected scored positions. S2A decode = every codec layer's steps x an
  S2A step (512 wide, 8 layers, 2048 MLP, 1024 codes; prompt and target, CFG).
  None for the codec rows: their count comes from the compiled program.
  """
  import aot_cost  # pylint: disable=import-outside-toplevel
  spec = row_spec(row, args)
  kind = spec["kind"]

  def dims(size):
    return aot_cost.Dims(size["hidden"], 4 * size["hidden"], size["layers"], size["vocab"], 4, 4, 0)

  if kind == "t2s_decode":
    step, _ = aot_cost.decode_step_minimum(dims(spec["size"]), spec["batch"], PHONES, PROMPT,
                                           spec["target"], cfg=True)
    return step * spec["steps"] * spec["scale"]
  if kind == "t2s_forward":
    d, target = dims(spec["size"]), spec["target"]
    return (spec["batch"] * (d.forward(PHONES + PROMPT + target) + 4.0 * d.hidden * d.mlp * PHONES
                             + d.per_row + 2.0 * d.hidden * d.vocab * target))
  if kind == "t2s_train":
    from metis_jax import config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config("tiny" if spec["size"] is TINY else "metis_base",
                                    [f"train.seq_length={spec['length']}"])
    flops, _ = aot_cost.train_minimum(dims(spec["size"]), spec["batch"], spec["length"],
                                      aot_cost.scored_fraction(config))
    return flops
  if kind == "s2a_decode":
    d = aot_cost.Dims(512, 2048, 8, 1024, 4, 4, 0)
    step, _ = aot_cost.decode_step_minimum(d, spec["batch"], 0, PROMPT, spec["target"], cfg=True)
    return step * sum(S2A_STEPS)
  return None


def matmul_peak_runner():
  """XLA's float32 matmul at 2048^3 (17.2 GFLOP): the machine's attainable rate for the ceiling."""
  import jax  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (2048, 2048))
  b = jax.random.normal(jax.random.key(1), (2048, 2048))
  fn = jax.jit(lambda x, y: x @ y)
  run = lambda: jax.block_until_ready(fn(a, b))
  run.flops = 2.0 * 2048 ** 3
  return run


# ----------------------------------------------------------------------------- original side


def load_reference(src: str, codec: bool = False):
  """The sdist's `maskgct.maskgct` package, its submodules importable, `__init__`s not run."""
  import importlib  # pylint: disable=import-outside-toplevel
  import importlib.machinery  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  root = os.path.join(src, "maskgct")
  if not os.path.isdir(os.path.join(root, "maskgct", "tts", "maskgct")):
    raise FileNotFoundError(f"--reference_src {src}: no maskgct/maskgct/tts/maskgct inside; unpack "
                            "the maskgct sdist (pip download --no-deps --no-binary :all: maskgct)")
  for name, path in (("maskgct", root), ("maskgct.maskgct", os.path.join(root, "maskgct"))):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
  for sub in ("tts", "tts/maskgct", "codec", "codec/amphion_codec", "codec/kmeans"):
    name = "maskgct.maskgct." + sub.replace("/", ".")
    module = types.ModuleType(name)
    module.__path__ = [os.path.join(root, "maskgct", sub)]
    sys.modules[name] = module
  # The codec modules import mel helpers (torchaudio, librosa) that the timed paths never call.
  for missing in ("torchaudio", "librosa") if codec else ():
    try:
      importlib.import_module(missing)
    except ImportError:
      stub = types.ModuleType(missing)
      stub.__path__ = []
      stub.__spec__ = importlib.machinery.ModuleSpec(missing, None, is_package=True)
      sys.modules[missing] = stub
      if missing == "torchaudio":
        for sub in ("functional", "functional.functional"):
          m = types.ModuleType(f"torchaudio.{sub}")
          m.__path__ = []
          m.__spec__ = importlib.machinery.ModuleSpec(f"torchaudio.{sub}", None, is_package=True)
          m._hz_to_mel = m._mel_to_hz = lambda *a, **k: (_ for _ in ()).throw(
              ImportError("torchaudio is not installed"))
          sys.modules[f"torchaudio.{sub}"] = m
  return importlib


def reference_runner(spec: dict, src: str):
  """A blocking `run()` doing the row's work once with the original PyTorch code."""
  kind = spec["kind"]
  importlib = load_reference(src, codec=kind in ("acoustic_encode", "acoustic_decode",
                                                 "semantic_quantize"))
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  torch.manual_seed(0)
  if kind in ("t2s_decode", "t2s_forward", "t2s_train"):
    t2s = importlib.import_module("maskgct.maskgct.tts.maskgct.maskgct_t2s")
    size = spec["size"]
    model = t2s.MaskGCT_T2S(hidden_size=size["hidden"], num_layers=size["layers"],
                            num_heads=size["heads"], cond_codebook_size=size["vocab"])
    model.float()
    if kind == "t2s_train":
      model.train()
      b, n = spec["batch"], spec["length"]
      x0 = torch.randint(0, size["vocab"], (b, n))
      x_mask = torch.ones(b, n)
      phone_id = torch.zeros(b, 0, dtype=torch.long)  # pre-training: no phone prefix
      phone_mask = torch.ones(b, 0)
      opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

      def run():
        logits, final_mask, target, _, _ = model(x0, x_mask, phone_id, phone_mask)
        m = final_mask.squeeze(-1).bool()
        loss = torch.nn.functional.cross_entropy(logits[m], target[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
      return run
    model.eval()
    b, target = spec["batch"], spec["target"]
    prompt = torch.randint(0, size["vocab"], (b, PROMPT))
    phones = torch.randint(0, 363, (b, PHONES))
    if kind == "t2s_decode":
      def run():
        with torch.no_grad():
          model.reverse_diffusion(prompt, target, phones, n_timesteps=spec["steps"], cfg=CFG,
                                  rescale_cfg=0.75, temp=0.9, filter_thres=0.98)
      return run
    tokens = torch.randint(0, size["vocab"], (b, PROMPT + target))

    def run():
      with torch.no_grad():
        x = torch.cat([model.cond_emb(tokens[:, :PROMPT]),
                       model.mask_emb.weight[None].expand(b, target, -1)], dim=1)
        embeds = model.diff_estimator(x, torch.full((b,), 0.5), torch.ones(b, PROMPT + target),
                                      phone_embedding=model.phone_emb(phones),
                                      phone_mask=torch.ones(b, PHONES))
        model.to_logit(embeds[:, PROMPT:])
    return run
  if kind == "s2a_decode":
    s2a = importlib.import_module("maskgct.maskgct.tts.maskgct.maskgct_s2a")
    model = s2a.MaskGCT_S2A(num_quantizer=12, hidden_size=512, num_layers=8, num_heads=8,
                            codebook_size=1024, cond_codebook_size=8192, predict_layer_1=False)
    model.eval()
    b, t = spec["batch"], spec["target"]
    semantic = torch.randint(0, 8192, (b, PROMPT + t))
    prompt = torch.randint(0, 1024, (b, PROMPT, 12))

    def run():
      with torch.no_grad():
        cond = model.cond_emb(semantic)
        model.reverse_diffusion(cond, prompt, temp=1.5, filter_thres=0.98,
                                n_timesteps=list(spec["steps"]), cfg=CFG, rescale_cfg=0.75)
    return run
  if kind.startswith("acoustic"):
    codec = importlib.import_module("maskgct.maskgct.codec.amphion_codec.codec")
    encoder = codec.CodecEncoder(d_model=96, up_ratios=[3, 4, 5, 8], out_channels=256,
                                 use_tanh=False).eval()
    decoder = codec.CodecDecoder(
        in_channels=256, upsample_initial_channel=1536, up_ratios=[8, 5, 4, 3], num_quantizers=12,
        codebook_size=1024, codebook_dim=8, quantizer_type="fvq", quantizer_dropout=0.5,
        commitment=0.25, codebook_loss_weight=1.0, use_l2_normlize=True, codebook_type="euclidean",
        kmeans_init=False, kmeans_iters=10, decay=0.8, eps=0.5, threshold_ema_dead_code=2,
        weight_init=False, use_vocos=True, vocos_dim=512, vocos_intermediate_dim=4096,
        vocos_num_layers=30, n_fft=1920, hop_size=480, padding="same").eval()
    n = int(spec["seconds"] * 24000) // 480 * 480
    if kind == "acoustic_encode":
      wav = torch.randn(1, 1, n) * 0.1

      def run():
        with torch.no_grad():
          decoder.quantizer(encoder(wav))
      return run
    codes = torch.randint(0, 1024, (12, 1, n // 480))

    def run():
      with torch.no_grad():
        decoder(decoder.vq2emb(codes))
    return run
  if kind == "semantic_quantize":
    rep = importlib.import_module("maskgct.maskgct.codec.kmeans.repcodec_model")
    model = rep.RepCodec(codebook_size=8192, hidden_size=1024, codebook_dim=8, vocos_dim=384,
                         vocos_intermediate_dim=2048, vocos_num_layers=12).eval()
    feat = torch.randn(1, int(spec["seconds"] * 50), 1024)

    def run():
      with torch.no_grad():
        model.quantize(feat)
    return run
  raise ValueError(kind)


# ----------------------------------------------------------------------------- worker / driver


def worker(args) -> int:
  """One measurement in this process: prints 'RESULT {json}'."""
  import resource  # pylint: disable=import-outside-toplevel
  if args._worker == PEAK:
    spec, run = {}, matmul_peak_runner()
  else:
    spec = row_spec(args._worker, args)
    run = (jax_runner(spec, args.async_cpu) if args._side == "jax"
           else reference_runner(spec, args.reference_src))
  start = time.perf_counter()
  run()  # compile / warm up
  warm = time.perf_counter() - start
  times = []
  for _ in range(args.inner):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  # The matmul peak is a best case (the fastest run); rows report their median.
  seconds = min(times) if args._worker == PEAK else statistics.median(times)
  print("RESULT " + json.dumps(dict(seconds=seconds * spec.get("scale", 1.0),
                                    warmup=warm, peak_rss=peak,
                                    flops=getattr(run, "flops", None))), flush=True)
  return 0


def worker_env(side: str) -> dict:
  """Both sides on one device with 2 threads (XLA's CPU pool has one thread per core: 2 here)."""
  env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", JAX_PLATFORMS="cpu",
             OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def measure(row: str, side: str, args) -> dict:
  """One worker process for (row, side): its RESULT, or {'error': ...}."""
  python = args.reference_python if side == "ref" else sys.executable
  cmd = [python, os.path.abspath(__file__), "--_worker", row, "--_side", side,
         "--inner", str(args.inner), "--base_steps", str(args.base_steps),
         "--s2a_max_steps", str(args.s2a_max_steps), "--reference_src", args.reference_src or ""]
  cmd += ["--async_cpu"] if args.async_cpu else []
  env = worker_env(side)
  # No persistent compilation cache, except in the restart row (JAX's variable; '' = off).
  env["JAX_COMPILATION_CACHE_DIR"] = args.compilation_cache if row.endswith("_restart") else ""
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.row_timeout)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
  return {"error": " | ".join(tail)[-300:]}


def available_bytes() -> int:
  """MemAvailable of /proc/meminfo (0 where unreadable)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated; see the docstring")
  parser.add_argument("--reference_src", default="", help="unpacked maskgct sdist (omit: metis_jax alone)")
  parser.add_argument("--reference_python", default=sys.executable,
                      help="interpreter with torch, einops and transformers==4.41.* for the original")
  parser.add_argument("--rounds", type=int, default=3, help="alternations per row (medians)")
  parser.add_argument("--heavy_rounds", type=int, default=1, help="rounds for the base-size rows")
  parser.add_argument("--inner", type=int, default=2, help="timed runs per process (median)")
  parser.add_argument("--base_steps", type=int, default=1, help="decode steps of t2s_decode_base_step")
  parser.add_argument("--s2a_max_steps", type=int, default=4, help="cap on each S2A layer's steps")
  parser.add_argument("--base_train_gib", type=float, default=18.0,
                      help="t2s_train_base runs only with this much memory available")
  parser.add_argument("--async_cpu", action="store_true",
                      help="train rows with JAX's asynchronous CPU dispatch (its default) instead of the "
                      "train command's inline one, whose step buffers stay in the heap")
  parser.add_argument("--row_timeout", type=int, default=1800, help="seconds per measurement")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_side", default="jax", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:
    return worker(args)
  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    print(f"error: --rows: unknown {unknown}; known: {', '.join(ROWS)}", file=sys.stderr)
    return 2
  sides = ["jax"] + (["ref"] if args.reference_src else [])
  args.compilation_cache = tempfile.mkdtemp(prefix="compare_reference_xla_cache_")
  atexit.register(shutil.rmtree, args.compilation_cache, ignore_errors=True)
  print("sides: metis_jax" + (f" vs original ({args.reference_src}, {args.reference_python})"
                               if args.reference_src else " alone (no --reference_src)")
        + f"; float32, 2 threads, {args.rounds} rounds ({args.heavy_rounds} for base rows) x "
        f"{args.inner} timed runs", flush=True)
  peak = measure(PEAK, "jax", argparse.Namespace(**{**vars(args), "inner": max(args.inner, 8)}))
  peak_rate = peak["flops"] / peak["seconds"] if "error" not in peak else None
  results, work = {}, {}
  for row in rows:
    heavy = "base" in row
    per_side = {s: [] for s in sides}
    if row.endswith("_restart"):
      measure(row, "jax", args)  # the first run, which compiles and fills the cache
    for _ in range(args.heavy_rounds if heavy else args.rounds):
      for side in sides:
        free = available_bytes()
        if row == "t2s_train_base" and free < args.base_train_gib * 2 ** 30:
          per_side[side].append({"error": f"skipped: {gib(free)} GiB available, the row needs "
                                          f"about {args.base_train_gib:g} (--base_train_gib)"})
          continue
        per_side[side].append(measure(row, side, args))
    summary = {}
    for side, runs in per_side.items():
      ok = [r for r in runs if "error" not in r]
      summary[side] = (dict(seconds=statistics.median(r["seconds"] for r in ok),
                            peak_rss=max(r["peak_rss"] for r in ok)) if ok
                       else {"error": runs[-1]["error"]})
    results[row] = summary
    program = [r.get("flops") for r in per_side["jax"] if r.get("flops")]
    work[row] = model_flops(row, args) or (program[0] if program else None)
    print(f"  {row}: " + ", ".join(
        f"{s} " + (f"{v['seconds']:.3f}s {gib(v['peak_rss'])}GiB" if "error" not in v else v["error"])
        for s, v in summary.items()), file=sys.stderr, flush=True)

  header = f"{'row':<24}{'GFLOP':>9}{'metis_jax s':>12}{'GFLOP/s':>9}{'RSS GiB':>9}"
  if "ref" in sides:
    header += f"{'original s':>12}{'GFLOP/s':>9}{'RSS GiB':>9}{'ratio':>8}{'ceiling':>9}"
  print(header)
  print("-" * len(header))

  def rate(flops, side):
    return f"{flops / side['seconds'] / 1e9:>9.0f}" if flops and "error" not in side else f"{'':>9}"

  for row, summary in results.items():
    j, flops = summary["jax"], work[row]
    line = f"{row:<24}" + (f"{flops / 1e9:>9.1f}" if flops else f"{'':>9}")
    line += (f"{j['seconds']:>12.3f}{rate(flops, j)}{gib(j['peak_rss']):>9}" if "error" not in j
             else f"{'error':>12}{'':>18}")
    if "ref" in sides:
      r = summary["ref"]
      line += (f"{r['seconds']:>12.3f}{rate(flops, r)}{gib(r['peak_rss']):>9}" if "error" not in r
               else f"{'error':>12}{'':>18}")
      if "error" not in r and "error" not in j:
        line += f"{r['seconds'] / j['seconds']:>8.2f}"
        if flops and peak_rate:
          line += f"{r['seconds'] * peak_rate / flops:>9.2f}"
    print(line)
    for side, v in summary.items():
      if "error" in v:
        print(f"    {side} failed: {v['error']}")
  if "tiny_decode_b8" in results and "t2s_decode_tiny_10s" in results:
    print("tiny decode 10 s throughput, batch 8 vs batch 1 (generated tokens/s):")
    for side in sides:
      b8, b1 = results["tiny_decode_b8"][side], results["t2s_decode_tiny_10s"][side]
      if "error" in b8 or "error" in b1:
        continue
      t8, t1 = 8 * 500 / b8["seconds"], 500 / b1["seconds"]
      print(f"  {side}: batch 1 {t1:.1f}, batch 8 {t8:.1f} ({t8 / t1:.2f}x)")
  if peak_rate:
    print(f"matmul peak: {peak_rate / 1e9:.0f} GFLOP/s (XLA float32 2048^3, this machine, 2 threads); "
          "ceiling = the ratio a program doing the row's GFLOP at that rate would reach")
  else:
    print(f"matmul peak: not measured ({peak['error']})")
  print("(GFLOP: the row's minimum work (aot_cost's analytical count), or the compiled program's "
        "for the loop-free codec rows)")
  print("(ratio = original / metis_jax; > 1: metis_jax faster. Rows scaled: "
        f"t2s_decode_base_step per step of {args.base_steps}; s2a_decode steps capped at "
        f"{args.s2a_max_steps} and scaled to [40, 16, 1 x 10].)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
