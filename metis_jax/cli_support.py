"""What every metis_jax command shares: one `error:` line for user mistakes, `--help` exits 0, a quiet console.

  from metis_jax import cli_support
  if __name__ == "__main__":
    cli_support.run(loop.run_main)

`run(main_fn)`:
* turns a `UserError` (raised by library code for bad input), a flag error
  (absl), a config typo (`--config.model.num_layer=4` names the key and the
  closest valid one), a missing `--config` file and a missing input file
  into one line `error: <what>; <what to do>` on stderr and exit status 2,
  with no traceback;
* makes `--help` exit 0 (absl exits 1);
* keeps the console for what the user asked for: absl INFO lines are off
  when stderr is a terminal (`--verbosity=0` or `-v 0` shows them again;
  logs written to files or pipes keep INFO), and JAX's "Unable to initialize
  backend 'tpu'" probe warning is dropped where no TPU is attached.

Import this module before jax (it imports neither jax nor the package's
models), so the log filter is in place before the backends are probed.
"""

import contextlib
import difflib
import glob
import importlib.util
import logging as std_logging
import os
import sys
from typing import Callable, Optional, Sequence

from metis_jax import config_lib

EXIT_USER_ERROR = 2
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
_TPU_PROBE = "Unable to initialize backend 'tpu'"


class UserError(Exception):
  """Bad input from the user. The message names the file/key/value and says what to do."""


def fail(message: str) -> None:
  """Prints `error: <message>` (one line) and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


# ------------------------------------------------------------------ console


def _tpu_expected() -> bool:
  """A TPU is attached: TPU worker environment, or TPU device files and libtpu installed."""
  if any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")):
    return True
  if "tpu" in os.environ.get("JAX_PLATFORMS", "").lower():
    return True
  chips = glob.glob("/dev/accel*") or os.path.isdir("/dev/vfio")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


class _DropTpuProbe(std_logging.Filter):
  """Drops JAX's warning that the TPU backend could not start (expected without a TPU)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TPU_PROBE) and _TPU_PROBE not in record.getMessage()


def quiet_console() -> None:
  """Installs the TPU-probe filter (where no TPU is expected); call before jax starts its backends."""
  if not _tpu_expected():
    for name in ("jax._src.xla_bridge", "jax"):
      std_logging.getLogger(name).addFilter(_DropTpuProbe())


def _verbosity_given(argv: Sequence[str]) -> bool:
  return any(a in ("-v", "--verbosity") or a.startswith(("-v=", "--verbosity=")) for a in argv)


def _default_verbosity(argv: Sequence[str]) -> None:
  """absl logs WARNING and above on a terminal unless `--verbosity`/`-v` is given."""
  if _verbosity_given(argv) or not sys.stderr.isatty():
    return
  from absl import flags  # pylint: disable=import-outside-toplevel
  if "verbosity" in flags.FLAGS:
    flags.FLAGS.set_default("verbosity", -1)


# ------------------------------------------------------------------ config and flag errors


def _config_flag_names() -> list[str]:
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []
  return [name for name, flag in flags.FLAGS._flags().items()  # pylint: disable=protected-access
          if isinstance(flag, config_flags._ConfigFlag)]  # pylint: disable=protected-access


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name X` or `--name=X` in argv (the last one), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith((f"--{name}=", f"-{name}=")):
      value = arg.split("=", 1)[1]
  return value


def _overrides(argv: Sequence[str], name: str) -> list[tuple[str, str, str]]:
  """(the argument as given, dotted key, raw value) of every `--name.a.b=value` in argv."""
  out = []
  for i, arg in enumerate(argv):
    for prefix in (f"--{name}.", f"-{name}."):
      if arg.startswith(prefix):
        key, sep, raw = arg[len(prefix):].partition("=")
        if not sep and i + 1 < len(argv):
          raw = argv[i + 1]
        out.append((arg, key, raw))
  return out


def describe_config_error(argv: Sequence[str], error: BaseException) -> Optional[str]:
  """The user's mistake behind a failed config flag, as one sentence (None if not a config flag's).

  Checks the `--config` file, then every `--config.a.b=value` override
  against the loaded config: an unknown key is named with the closest valid
  ones (difflib).
  """
  for name in _config_flag_names():
    path = _flag_value(argv, name)
    if path is None:
      continue
    if not os.path.exists(config_lib.split_variant(path)[0]):
      configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
      return (f"--{name}: config file {path!r} does not exist; give a Python file with get_config(), "
              f"e.g. {os.path.relpath(os.path.join(configs, 'tiny.py'))}")
    try:
      config = config_lib.load_config(path)
    except Exception as e:  # pylint: disable=broad-except
      return f"--{name}: config file {path!r} failed to load ({type(e).__name__}: {_first_line(e)}); fix the file"
    for arg, key, raw in _overrides(argv, name):
      problem = _check_override(config, key, raw)
      if problem:
        return f"{arg}: {problem}"
  del error
  return None


def _check_override(config, key: str, raw: str) -> Optional[str]:
  node, walked = config, []
  for part in key.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(walked) or "the config"
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      hint = (f"did you mean {' or '.join(repr('.'.join(walked + [c])) for c in close)}?" if close
              else f"the keys of {where} are: {', '.join(sorted(keys)[:20])}")
      return f"unknown config key {key!r} ({part!r} is not in {where}); {hint}"
    node = node[part]
    walked.append(part)
  return None


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return (lines[0] if lines else type(e).__name__)[:300]


def _absl_message(error: BaseException) -> str:
  text = " ".join(str(error).split())
  if "must have a value other than None" in text and text.startswith("flag --"):
    name = text.split("=", 1)[0].removeprefix("flag ")
    return f"{name} is required; give {name}=..."
  return text


def _flags_parser(argv: list[str]):
  """absl's flag parsing, with errors raised as UserError (exit 2) instead of exit 1."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  _default_verbosity(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(describe_config_error(argv, e) or _absl_message(e)) from None
  except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    described = describe_config_error(argv, e)
    if described is None:
      raise
    raise UserError(described) from None


@contextlib.contextmanager
def _absl_errors_as_user_errors():
  """While active, `absl.app.run` parses flags with `_flags_parser` and reports UsageError as UserError."""
  from absl import app  # pylint: disable=import-outside-toplevel
  original = app.run

  def run(main, argv=None, flags_parser=None):
    def checked_main(args):
      try:
        return main(args)
      except app.UsageError as e:
        raise UserError(str(e)) from None
    return original(checked_main, argv=argv, flags_parser=flags_parser or _flags_parser)

  app.run = run
  try:
    yield
  finally:
    app.run = original


# ------------------------------------------------------------------ the wrapper


def _file_error_message(e: OSError) -> str:
  what = {FileNotFoundError: "does not exist", IsADirectoryError: "is a folder, not a file",
          NotADirectoryError: "is not a folder", PermissionError: "cannot be read (permission denied)"}
  if not e.filename:  # raised with a message of its own
    return _first_line(e)
  return f"{e.filename} {what.get(type(e), _first_line(e))}; check the path"


def run(main_fn: Callable[[], object], argv: Optional[Sequence[str]] = None) -> None:
  """Runs a command's `run_main` with the shared error, help and console handling (see the module doc)."""
  argv = list(sys.argv if argv is None else argv)
  quiet_console()
  wants_help = any(a in HELP_FLAGS for a in argv[1:])
  config_file = _flag_value(argv[1:], "config")
  if config_file is not None and not wants_help and not os.path.exists(config_lib.split_variant(config_file)[0]):
    fail(f"--config: config file {config_file!r} does not exist; give a Python file with get_config(), "
         "e.g. configs/tiny.py")
  try:
    with _absl_errors_as_user_errors():
      result = main_fn()
  except SystemExit as e:
    if wants_help and e.code in (None, 0, 1):
      sys.exit(0)
    raise
  except UserError as e:
    fail(str(e))
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
    fail(_file_error_message(e))
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  if isinstance(result, int) and not isinstance(result, bool):
    sys.exit(result)
