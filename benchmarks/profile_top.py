r"""CPU profile of the train step and tiny decode: the top XLA ops by self time.

  python benchmarks/profile_top.py                         # both workloads, top 15 each
  python benchmarks/profile_top.py --workloads train --train_config metis_base --train_shape 1x500 \
      --train_override model.remat_policy=none --train_override model.dtype=float32
  python benchmarks/profile_top.py --workloads decode --top 25 --trace_dir /tmp/prof
  python benchmarks/profile_top.py --parse /tmp/prof/train --hlo /tmp/prof/train/hlo.txt --runs 3

Each workload is compiled and warmed, then run `--repeats` times under
`jax.profiler.trace(..., create_perfetto_trace=True)`. The Perfetto trace JSON
(`plugins/profile/<run>/perfetto_trace.json.gz`) is read with the standard
library: every complete event ('ph' == 'X') that carries an `hlo_op` argument is
an XLA thunk; its self time is its duration less the durations of the events
nested inside it on the same thread. Self times are summed per (module, op) and
printed with the op's share of all op time, its calls per run, and, from the
compiled HLO text, its result shape and the JAX source op (`metadata.op_name`),
so `fusion.42` reads as what it computes.

Workloads (random weights):
  train   the trainer's jitted step of --train_config (default tiny) with its
          --train_override settings, B x T from --train_shape (default 4 x 500,
          the issue's row), synthetic batch, state donated.
  decode  MetisDecoder, 3 s prompt + 10 s target (150 + 500 tokens), 25 steps,
          CFG 2.5, batch --decode_batch.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (result shape, opcode, metadata op_name) from compiled HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = HLO_LINE.match(line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    op_name = OP_NAME.search(line)
    out.setdefault(name, (shape, opcode, op_name.group(1) if op_name else ""))
  return out


def load_trace(trace_dir: str) -> list[dict]:
  """The events of the newest Perfetto trace JSON under `trace_dir`."""
  files = (sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
           or sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                     key=os.path.getmtime))
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: trace with "
                            "jax.profiler.trace(dir, create_perfetto_trace=True)")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, self time in us) for every complete event: duration less nested children."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      by_thread[(e.get("pid"), e.get("tid"))].append(e)
  out = []
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []  # [event, child time]
    for e in evs:
      while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
        done, child = stack.pop()
        out.append((done, done["dur"] - child))
      if stack:
        stack[-1][1] += e["dur"]
      stack.append([e, 0.0])
    out.extend((done, done["dur"] - child) for done, child in stack)
  return out


def top_ops(events: list[dict], runs: int, top: int, hlo: dict | None = None) -> list[dict]:
  """The `top` XLA ops by summed self time; times are per run (total / runs)."""
  totals = collections.defaultdict(float)
  calls = collections.Counter()
  for e, self_us in self_times(events):
    args = e.get("args") or {}
    if "hlo_op" not in args:
      continue
    key = (args.get("hlo_module", ""), args["hlo_op"])
    totals[key] += self_us
    calls[key] += 1
  all_us = sum(totals.values()) or 1.0
  rows = []
  for key, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    shape, opcode, op_name = (hlo or {}).get(key[1], ("", "", ""))
    rows.append(dict(module=key[0], op=key[1], ms=us / 1e3 / runs, share=us / all_us,
                     calls=calls[key] / runs, shape=shape, opcode=opcode, source=op_name))
  return rows, all_us / 1e3 / runs


def format_table(title: str, rows: list[dict], total_ms: float) -> str:
  lines = [f"{title}: all XLA op self time {total_ms:.1f} ms per run",
           f"{'op':<28}{'ms/run':>9}{'share':>7}{'calls':>7}  {'shape':<26}source"]
  lines.append("-" * 110)
  for r in rows:
    source = r["source"]
    source = source if len(source) <= 70 else "..." + source[-67:]
    lines.append(f"{r['op'][:27]:<28}{r['ms']:>9.2f}{100 * r['share']:>6.1f}%{r['calls']:>7.0f}  "
                 f"{r['shape'][:25]:<26}{source}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- workloads


def train_workload(batch: int, length: int, config_name: str = "tiny", overrides=()):
  """(run() -> blocks, its compiled executable) for the train step of `config_name` at batch x
  length, as the training loop runs it (`compare_reference.py` times the same step)."""
  import jax  # pylint: disable=import-outside-toplevel
  from metis_jax import config_lib  # pylint: disable=import-outside-toplevel
  from metis_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from metis_jax.training import compile_ahead, input_pipeline, state as train_state, step as step_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config(config_name, [
      "train.synthetic_data=True", "mesh.fsdp=-1", "mesh.dcn_data=1", f"train.global_batch_size={batch}",
      f"train.seq_length={length}", f"data.bucket_lengths=({length},)", *overrides])
  mesh = mesh_lib.create_mesh(config.mesh)
  setup = train_state.make_setup(config)
  holder = {"state": train_state.create_sharded_state(setup, mesh, config.seed)}
  spec = input_pipeline.batch_spec(config)
  step_fn = step_lib.jit_train_step(setup, config, mesh, train_state.state_shardings(setup, mesh), spec)
  batch_arrays = next(input_pipeline.make_train_iterator(config, mesh))
  # As the training loop runs it: compiled ahead, step buffers kept in the heap.
  step_fn = compile_ahead.compile_ahead(step_fn, holder["state"], [spec])

  def run():
    holder["state"], metrics = step_fn(holder["state"], batch_arrays)
    jax.block_until_ready(metrics)

  return run, next(iter(step_fn.executables.values()))


def decode_workload(batch: int, prompt_s: float = 3.0, target_s: float = 10.0, steps: int = 25,
                    cfg: float = 2.5):
  """(run() -> blocks, compiled HLO text) for the tiny decoder."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from metis_jax import config_lib  # pylint: disable=import-outside-toplevel
  from metis_jax.inference import decoding  # pylint: disable=import-outside-toplevel
  from metis_jax.models import metis  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config("tiny")
  model = metis.MetisModel(metis.MetisConfig.from_config(config.model))
  params = jax.jit(lambda r: metis.init_params(model, r))(jax.random.key(0))
  options = dataclasses.replace(decoding.DecodeOptions.from_config(config.decode), steps=steps, cfg=cfg)
  decoder = decoding.MetisDecoder(model, options)
  prompt_len, target_len = int(prompt_s * 50), int(target_s * 50)
  prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.model.vocab_size)
  args = (params, jax.random.key(2), prompt, jnp.full((batch,), prompt_len),
          jnp.full((batch,), target_len))
  kwargs = dict(target_len=target_len, phones=None, phone_lengths=None, prompt_features=None,
                target_features=None)
  hlo = decoder._jitted.lower(*args, **kwargs).compile().as_text()

  def run():
    decoder(*args, target_len=target_len).block_until_ready()

  return run, hlo


def profile(name: str, run, hlo: str, trace_dir: str, repeats: int, top: int) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  for _ in range(2):  # compile and warm outside the trace
    run()
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(repeats):
      run()
  wall = (time.perf_counter() - start) / repeats
  with open(os.path.join(trace_dir, "hlo.txt"), "w") as f:  # for a later --parse --hlo
    f.write(hlo)
  rows, total = top_ops(load_trace(trace_dir), repeats, top, hlo_index(hlo))
  return format_table(f"{name} ({wall * 1e3:.1f} ms wall per run, traced)", rows, total)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", default="train,decode")
  parser.add_argument("--train_shape", default="4x500", help="B x T of the train step")
  parser.add_argument("--train_config", default="tiny", help="config of the train step (tiny, metis_base, ...)")
  parser.add_argument("--train_override", action="append", default=[],
                      help="key=value for the train config (repeatable)")
  parser.add_argument("--decode_batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--trace_dir", default="", help="where traces go (default: a temp dir)")
  parser.add_argument("--parse", default="", help="only summarize the trace under this folder")
  parser.add_argument("--hlo", default="", help="with --parse: compiled HLO text to name ops "
                      "(profile runs leave it as hlo.txt beside the trace)")
  parser.add_argument("--runs", type=int, default=1, help="with --parse: runs in the trace")
  args = parser.parse_args()
  if args.parse:
    hlo = hlo_index(open(args.hlo).read()) if args.hlo else None
    rows, total = top_ops(load_trace(args.parse), args.runs, args.top, hlo)
    print(format_table(args.parse, rows, total))
    return 0
  root = args.trace_dir or tempfile.mkdtemp(prefix="metis_profile_")
  if "train" in args.workloads.split(","):
    # The train command's CPU dispatch (inline), set before the backend starts; a decode
    # profiled in the same process runs with it too.
    from metis_jax.training import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.run_cpu_programs_inline()
  for name in args.workloads.split(","):
    if name == "train":
      b, t = (int(x) for x in args.train_shape.lower().split("x"))
      run, executable = train_workload(b, t, args.train_config, args.train_override)
      hlo = executable.as_text()
      title = f"{args.train_config} train step {b}x{t}"
    elif name == "decode":
      run, hlo = decode_workload(args.decode_batch)
      title = f"tiny decode b={args.decode_batch} 3s+10s 25 steps CFG 2.5"
    else:
      print(f"error: --workloads: unknown workload {name!r}; use train and/or decode", file=sys.stderr)
      return 2
    print(profile(title, run, hlo, os.path.join(root, name), args.repeats, args.top), flush=True)
    print(f"(trace: {os.path.join(root, name)})\n", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
