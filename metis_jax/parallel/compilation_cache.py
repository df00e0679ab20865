"""The persistent compilation cache: compiled XLA programs kept on disk between runs.

A restarted or resumed run, and every decode after the first at the same shapes, then
loads its programs instead of compiling them. On a 2-core CPU the tiny train step
(B 4 x T 500) loads in 0.8 s instead of compiling in 3.8 s, and the process peaks at
0.39 GiB of host memory instead of 0.67 (compiling is that run's peak; compare_reference's
t2s_train_tiny rows). On a TPU pod it
saves the minutes a base-size step takes to compile after every preemption.

This is JAX's own cache: an entry's key covers the program, the compile options, the
XLA flags, the devices and the jax/jaxlib versions, so a changed program or an upgrade
never loads a stale entry. Programs that compile in under a second are not stored (JAX's
`jax_persistent_cache_min_compile_time_secs`).

Which folder, in order (`resolve`):
  1. the command's `--compilation_cache_dir` (train, decode, data.tokenize; '' turns the
     cache off);
  2. JAX's own JAX_COMPILATION_CACHE_DIR, when it is set (empty: off), left to JAX;
  3. $XDG_CACHE_HOME/metis_jax/xla, by default ~/.cache/metis_jax/xla.
A multi-host job reads and writes it from every host: point it at a folder they share (a
gs:// bucket on a TPU pod) so that all hosts find what one compiled. The cache is trusted
code: never share the folder with users you do not trust.

JAX evicts old entries only with the `filelock` package installed; a local folder is
otherwise kept under `max_bytes` here, oldest entries first, when the cache is enabled.
A folder given by the flag that cannot be created or written is a user error; the default
one in that state (a read-only home) only turns the cache off, with a warning.
"""

import os
from typing import Optional

from absl import logging

from metis_jax import cli_support

DEFAULT_MAX_BYTES = 4 << 30
ENV_JAX_DIR = "JAX_COMPILATION_CACHE_DIR"
# The `--compilation_cache_dir` flag of the commands that compile models (train, decode,
# data.tokenize).
FLAG_HELP = ("Compiled programs kept between runs (the next run at the same shapes loads them "
             "instead of compiling): default JAX_COMPILATION_CACHE_DIR if set, else "
             "~/.cache/metis_jax/xla; '' turns it off; on a pod, a gs:// folder all hosts share.")


def default_dir() -> str:
  """$XDG_CACHE_HOME/metis_jax/xla, or ~/.cache/metis_jax/xla."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "metis_jax", "xla")


def resolve(flag_value: Optional[str]) -> Optional[str]:
  """The folder to use, or None to leave JAX's setting as it is (its variable, or off).

  Args:
    flag_value: the command's `--compilation_cache_dir`: None when not given, '' for off.

  Returns:
    A folder ('' = off) for `enable`, or None where JAX_COMPILATION_CACHE_DIR decides.
  """
  if flag_value is not None:
    return os.path.expanduser(flag_value)
  if ENV_JAX_DIR in os.environ:
    return None
  return default_dir()


def unusable(directory: str) -> Optional[str]:
  """Why a local folder cannot hold the cache (it is created if missing), or None if it can."""
  if "://" in directory:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    return e.strerror or str(e)
  return None if os.access(directory, os.W_OK | os.X_OK) else "not writable"


def prune(directory: str, max_bytes: int) -> int:
  """Deletes the oldest files of a local cache folder until it holds at most `max_bytes`.

  Returns:
    The number of bytes deleted (0 for a remote path or a folder within the limit).
  """
  if "://" in directory or not os.path.isdir(directory):
    return 0
  entries = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    try:
      stat = os.stat(path)
    except OSError:  # removed by another process meanwhile
      continue
    if os.path.isfile(path):
      entries.append((stat.st_mtime, stat.st_size, path))
  total = sum(size for _, size, _ in entries)
  deleted = 0
  for _, size, path in sorted(entries):
    if total - deleted <= max_bytes:
      break
    try:
      os.remove(path)
      deleted += size
    except OSError:
      pass
  return deleted


def enable(flag_value: Optional[str], max_bytes: int = DEFAULT_MAX_BYTES) -> Optional[str]:
  """Points JAX's persistent compilation cache at `resolve(flag_value)`.

  Call it before the first compile of the process (the commands do, at start-up); a cache
  set up by an earlier call is replaced.

  Returns:
    The folder in use, '' when turned off, or None where JAX's variable decides.

  Raises:
    cli_support.UserError: the flag names a folder that cannot be created or written.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache as jax_cache  # pylint: disable=import-outside-toplevel
  directory = resolve(flag_value)
  if directory is None:
    return None
  problem = unusable(directory) if directory else None
  if problem and flag_value is not None:
    raise cli_support.UserError(f"--compilation_cache_dir {directory}: {problem}; give a writable "
                                "folder, or '' to turn the compilation cache off")
  if problem:
    logging.warning("compilation cache %s: %s; running without it (--compilation_cache_dir "
                    "puts it elsewhere)", directory, problem)
    directory = ""
  jax_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", directory or None)
  if directory:
    freed = prune(directory, max_bytes)
    if freed:
      logging.info("compilation cache %s: removed %.1f MiB of its oldest entries", directory,
                   freed / 2 ** 20)
  return directory
