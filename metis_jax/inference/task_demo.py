r"""The fine-tuning demo end to end: tiny SE / TSE / VC fine-tunes decode their held-out sets
through the default job's parts, scored against the corrupted inputs they start from.

  python -m metis_jax.inference.task_demo --bundle /tmp/metis_tiny \
      --finetune se=/tmp/ft_se,tse=/tmp/ft_tse,vc=/tmp/ft_vc --out /tmp/task_demo

`--bundle` is the default job's workdir (decode_bundle.json: both S2A models, the SSL
tokenizer, the Griffin-Lim mel renderer); each `--finetune task=DIR` a fine-tune's workdir
(`python -m metis_jax.train --config configs/finetune_tiny.py:<task> ...`: its config.json
and export/model), or its export/model folder. For each task:

  1. the held-out set (`task_heldout`): the demo's held-out utterances corrupted as in the
     fine-tune's training (noise at a drawn SNR, an interfering speaker at a drawn SIR, a
     timbre perturbation), as wavs and a manifest under `<out>/<task>/data/`;
  2. the decode, in this process through the command line's own entry (`cli.run_cli`):
       python -m metis_jax.decode --task <task> --model <ft>/export/model --bundle <bundle> \
           --manifest <out>/<task>/data/manifest.jsonl --output_dir <out>/<task>/decoded --seed <seed>
     which writes the outputs, report.jsonl and report.html (with the baseline table);
  3. the measures of each output against its clean reference next to those of the input
     itself (the baseline: noisy input, mixture, perturbed source) for every task: printed,
     in `<out>/summary.txt`, `<out>/summary.json` and one page for all tasks,
     `<out>/report.html`.

Everything is deterministic for a given `--seed` (the sets and the decode's streams).
Exit status: 0 all decoded, 1 some examples failed, 2 bad input (one `error:` line).
"""

import json
import os
import sys
from typing import Optional, Sequence

from absl import flags

from metis_jax import cli_support

FINETUNE_TASKS = ("se", "tse", "vc")


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  flags.DEFINE_string("bundle", None, "The default job's workdir (decode_bundle.json).", flag_values=fv)
  flags.DEFINE_list("finetune", [], "task=DIR for each task (se, tse, vc): a fine-tune's workdir "
                    "(config.json + export/model) or its export/model folder.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder (held-out sets, decodes, reports).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the held-out sets and of the decode.", flag_values=fv)
  flags.DEFINE_integer("max_examples", 0, "Examples per task (0 = every held-out target).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "Decode batch size.", flag_values=fv)
  return fv


def parse_finetunes(specs: Sequence[str]) -> dict:
  """['se=DIR', ...] -> {task: (model folder, workdir config dict)}; UserError naming the entry."""
  out = {}
  for spec in specs:
    task, sep, path = spec.partition("=")
    task = task.strip()
    if not sep or not path:
      raise cli_support.UserError(f"--finetune {spec!r}: expected task=DIR, e.g. se=/tmp/ft_se")
    if task not in FINETUNE_TASKS:
      raise cli_support.UserError(f"--finetune {spec!r}: task {task!r} is not one of {', '.join(FINETUNE_TASKS)}")
    if task in out:
      raise cli_support.UserError(f"--finetune: task {task!r} given twice")
    out[task] = _finetune_run(task, path)
  if not out:
    raise cli_support.UserError("--finetune: give at least one task=DIR (se, tse, vc)")
  return out


def _finetune_run(task: str, path: str) -> tuple:
  """(export/model folder, config dict) of a fine-tune given as its workdir or export/model."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "export", "model")):
    model, workdir = os.path.join(path, "export", "model"), path
  elif os.path.isfile(os.path.join(path, "model_config.json")):
    model, workdir = path, os.path.dirname(os.path.dirname(path))
  else:
    raise cli_support.UserError(f"--finetune {task}={path}: neither a fine-tune workdir (with export/model) "
                                "nor an exported model (with model_config.json); train one: python -m "
                                f"metis_jax.train --config configs/finetune_tiny.py:{task} --workdir DIR "
                                "--config.finetune.base=<the default job's workdir>")
  config_path = os.path.join(workdir, "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise cli_support.UserError(f"--finetune {task}={path}: cannot read {config_path} ({type(e).__name__}); "
                                "the held-out set is made from the fine-tune's own task data") from e
  trained = (config.get("finetune") or {}).get("task")
  if trained != task:
    raise cli_support.UserError(f"--finetune {task}={path}: {config_path} is a {trained!r} fine-tune, not {task!r}")
  return model, config


def decode_argv(task: str, model: str, bundle: str, manifest: str, output_dir: str, seed: int,
                batch_size: int) -> list:
  """The `python -m metis_jax.decode` command line of one task's held-out set (argv[0] included)."""
  return ["decode", "--task", task, "--model", model, "--bundle", bundle, "--manifest", manifest,
          "--output_dir", output_dir, "--seed", str(seed), "--batch_size", str(batch_size)]


def _read_rows(path: str) -> list:
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def run(bundle: str, finetunes: dict, out: str, seed: int = 0, max_examples: int = 0, batch_size: int = 8,
        stream=None) -> dict:
  """Makes, decodes and scores every task's held-out set (module doc); returns the summary dict
  {'tasks': {task: {...}}, 'table': str, 'exit': 0 | 1}.

  Raises:
    cli_support.UserError: a bundle, fine-tune or task corpus that cannot be used.
  """
  from metis_jax.inference import cli, evaluation, report_html, task_heldout  # pylint: disable=g-import-not-at-top
  from metis_jax.inference import demo_bundle  # pylint: disable=g-import-not-at-top
  stream = stream or sys.stderr
  if not bundle or not demo_bundle.is_bundle(bundle):
    raise cli_support.UserError(f"--bundle {bundle}: no {demo_bundle.BUNDLE_NAME} there; give the default job's "
                                "workdir (python -m metis_jax.train --config configs/tiny.py --workdir DIR)")
  if not out:
    raise cli_support.UserError("--out: give the output folder")
  bundle = os.path.abspath(bundle)
  tasks, all_rows, worst = {}, [], 0
  for task, (model, config) in finetunes.items():
    data_dir = os.path.join(out, task, "data")
    try:
      corpus = task_heldout.corpus_of_run(config)
      manifest = task_heldout.write_task_set(task, corpus, data_dir, seed=seed, max_examples=max_examples)
    except task_heldout.HeldoutError as e:
      raise cli_support.UserError(f"--finetune {task}: {e}") from e
    output_dir = os.path.join(out, task, "decoded")
    argv = decode_argv(task, model, bundle, manifest, output_dir, seed, batch_size)
    print(f"[task_demo] {task}: " + " ".join(["python -m metis_jax.decode"] + argv[1:]), file=stream, flush=True)
    code = cli.run_cli(argv, stream)
    if code == 2:
      raise cli_support.UserError(f"the {task} decode could not start (its error: line above)")
    worst = max(worst, code)
    rows = _read_rows(os.path.join(output_dir, "report.jsonl"))
    all_rows += rows
    tasks[task] = {"model": model, "manifest": manifest, "report": os.path.join(output_dir, "report.jsonl"),
                   "decode_command": " ".join(["python -m metis_jax.decode"] + argv[1:]), "exit": code,
                   "examples": len(rows), "ok": sum(r.get("status") == "ok" for r in rows),
                   "baseline": evaluation.baseline_rows(rows)}
  report = evaluation.Report(None)
  for row in all_rows:
    report.add(row)
  table = report.table()
  summary = report.summary(sum(r.get("wall_seconds") or 0.0 for r in all_rows))
  html = report_html.write(os.path.join(out, "report.html"), all_rows, summary, evaluation.SUMMARY_COLUMNS,
                           title="metis_jax fine-tuning demo: held-out SE / TSE / VC")
  with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  result = {"tasks": tasks, "table": table, "html": html, "exit": worst, "seed": seed, "bundle": bundle}
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  return result


def run_cli(argv: Sequence[str], stream=None) -> int:
  """Parses `argv` (argv[0] the program) and runs; returns the exit status (UserError propagates)."""
  fv = define_flags(flags.FlagValues())
  try:
    fv(list(argv))
  except flags.Error as e:
    raise cli_support.UserError(str(e)) from None
  if not fv.bundle or not fv.out:
    raise cli_support.UserError("give --bundle (the default job's workdir), --finetune task=DIR,... and --out")
  result = run(fv.bundle, parse_finetunes(fv.finetune), fv.out, fv.seed, fv.max_examples, fv.batch_size, stream)
  print(result["table"])
  print(f"[task_demo] report {result['html']}; summary {os.path.join(fv.out, 'summary.json')}",
        file=stream or sys.stderr)
  return result["exit"]


def run_main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if any(a in cli_support.HELP_FLAGS for a in argv[1:]):
    print(__doc__)
    print(define_flags(flags.FlagValues()).get_help())
    return 0
  return run_cli(argv)


if __name__ == "__main__":
  cli_support.run(run_main)
