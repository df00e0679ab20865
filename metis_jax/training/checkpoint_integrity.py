"""What makes a checkpoint trustworthy: array digests, completeness records, agreement.

* `tree_digests(tree)`: a 64-bit digest of every array of a pytree,
  computed on the devices in one jitted pass (no host copy). Each element's
  bits are mixed with its global index and summed modulo 2^32, twice with
  different mixes; integer sums are exact in any order, so the digest does
  not depend on the mesh the array is sharded over and a checkpoint saved on
  one mesh is verified on another. Any single changed element changes both
  sums (the mix is a bijection of the element's bits).
* `IntegrityHandler`: an Orbax item that writes this process's record,
  `process_<i>-of-<n>.json`, inside the checkpoint (so it appears atomically
  with the rest); a checkpoint lacking one process's record is incomplete.
* `inspect_step(...)`: the files every process's part needs, checked before
  anything is loaded.
* `agree(tag, value)`: every process's value, exchanged through the JAX
  coordination service with a bounded timeout (a process that does not
  answer is named in the error instead of hanging the others).
"""

import dataclasses
import itertools
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

INTEGRITY = "integrity"
FORMAT = 1
_GOLDEN = np.uint32(0x9E3779B9)
_MIX1 = np.uint32(0x85EBCA6B)
_MIX2 = np.uint32(0xC2B2AE35)


class CheckpointError(RuntimeError):
  """No checkpoint can be restored, or the processes could not agree on one (with the reason)."""


# ------------------------------------------------------------------ digests


def _fmix(a: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (a bijection of uint32)."""
  a = a ^ (a >> 16)
  a = a * _MIX1
  a = a ^ (a >> 13)
  a = a * _MIX2
  return a ^ (a >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of every element as uint32, same shape (64-bit types add a trailing [2])."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = x.dtype.itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


def _digest(x: jax.Array) -> jax.Array:
  """uint32 [2]: two order-independent sums of mixed (element bits, global element index)."""
  u = _as_uint32(x)
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):  # the row-major flat index, built without a reshape
    index = index + lax.broadcasted_iota(jnp.uint32, u.shape, d) * np.uint32(stride % 2**32)
    stride *= u.shape[d]
  h1 = jnp.sum(_fmix(u ^ (index * _GOLDEN)), dtype=jnp.uint32)
  h2 = jnp.sum(_fmix(u + _fmix(index + np.uint32(1))), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


@jax.jit
def _digests(leaves: list) -> jax.Array:
  return jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def array_paths(tree: Any) -> list[str]:
  """The leaves' key paths, e.g. ".opt_state[1][0].mu['token_embed']['embedding']"."""
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def tree_digests(tree: Any) -> dict[str, dict]:
  """{key path: {'shape', 'dtype', 'digest' (16 hex digits)}} of every array leaf.

  Runs on the devices over the global arrays (every process must call it, as
  with any computation on multi-process arrays); only two uint32 per array
  come back to the host.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in flat]
  out = _digests(leaves)
  values = np.asarray(out.addressable_data(0)) if isinstance(out, jax.Array) else np.asarray(out)
  return {jax.tree_util.keystr(path): {"shape": list(x.shape), "dtype": str(x.dtype),
                                       "digest": f"{int(v[0]):08x}{int(v[1]):08x}"}
          for (path, _), x, v in zip(flat, leaves, values)}


def compare_digests(saved: dict[str, dict], restored: dict[str, dict]) -> list[str]:
  """Human-readable differences between the saved record and the restored arrays ([] = intact)."""
  problems = []
  for path, want in saved.items():
    got = restored.get(path)
    if got is None:
      problems.append(f"{path}: in the checkpoint's record but not in the restored state")
    elif (got["shape"], got["dtype"]) != (want["shape"], want["dtype"]):
      problems.append(f"{path}: saved {want['dtype']}{want['shape']}, restored {got['dtype']}{got['shape']}")
    elif got["digest"] != want["digest"]:
      problems.append(f"{path}: content digest {got['digest']} != saved {want['digest']} "
                      "(the bytes on disk changed after the save)")
  problems.extend(f"{path}: not in the checkpoint's record" for path in restored if path not in saved)
  return problems


# ------------------------------------------------------------------ the record item


def record_name(process_index: int, process_count: int) -> str:
  return f"process_{process_index}-of-{process_count}.json"


class IntegrityHandler(ocp.CheckpointHandler):
  """Writes (and reads) this process's completeness record inside a checkpoint."""

  def save(self, directory: epath.Path, args: "IntegritySave") -> None:
    record = dict(args.record, process_index=jax.process_index(), process_count=jax.process_count())
    (epath.Path(directory) / record_name(jax.process_index(), jax.process_count())).write_text(
        json.dumps(record, indent=1, sort_keys=True))

  def restore(self, directory: epath.Path, args: Optional["IntegrityRestore"] = None) -> dict:
    del args
    return json.loads((epath.Path(directory) / record_name(jax.process_index(), jax.process_count()))
                      .read_text())

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass

  @classmethod
  def typestr(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(IntegrityHandler, for_save=True)
@dataclasses.dataclass
class IntegritySave(ocp.args.CheckpointArgs):
  record: dict


@ocp.args.register_with_handler(IntegrityHandler, for_restore=True)
@dataclasses.dataclass
class IntegrityRestore(ocp.args.CheckpointArgs):
  pass


# ------------------------------------------------------------------ structure, before loading


@dataclasses.dataclass
class Inspection:
  """What `inspect_step` found.

  Attributes:
    problems: reasons the checkpoint cannot be restored ([] = looks complete).
    saved_process_count: processes that wrote it (None if unknown).
    digests: the saved digests (None for a checkpoint written before records existed).
    notes: harmless findings worth a log line.
  """
  problems: list
  saved_process_count: Optional[int]
  digests: Optional[dict]
  notes: list


def _read_json(path: epath.Path) -> tuple[Any, Optional[str]]:
  try:
    return json.loads(path.read_text()), None
  except FileNotFoundError:
    return None, f"{path.name} is missing"
  except (OSError, ValueError, UnicodeDecodeError) as e:
    return None, f"{path.name} is unreadable ({type(e).__name__}: {e})"


def _count_from_names(directory: epath.Path) -> Optional[int]:
  """n of the `process_<i>-of-<n>.json` files in `directory` (the most common one)."""
  counts = []
  if directory.exists():
    for f in directory.iterdir():
      name = f.name
      if name.startswith("process_") and name.endswith(".json") and "-of-" in name:
        try:
          counts.append(int(name[:-len(".json")].rsplit("-of-", 1)[1]))
        except ValueError:
          pass
  return max(set(counts), key=counts.count) if counts else None


def inspect_step(step_dir: epath.Path, state_item: str, data_item: str, process_count: int) -> Inspection:
  """Checks, without loading any array, that checkpoint `step_dir` is complete for every process.

  Complete means: Orbax's metadata and manifest of the state are there, each
  saving process's OCDBT part has its manifest, each process's input
  position and completeness record are there, and the records agree on the
  digests. A missing input position of the *current* process count is
  damage; a checkpoint saved by a different number of processes is
  restorable (its input positions cannot be mapped; noted).
  """
  step_dir = epath.Path(step_dir)
  problems, notes = [], []
  records_dir = step_dir / INTEGRITY
  saved_n = _count_from_names(records_dir) if records_dir.exists() else None
  legacy = not records_dir.exists()
  if saved_n is None:
    saved_n = _count_from_names(step_dir / data_item)
  state = step_dir / state_item
  for name in ("_METADATA",):
    if not (state / name).exists():
      problems.append(f"{state_item}/{name} is missing (Orbax's description of the arrays)")
  ocdbt = any(p.name.startswith("ocdbt.process_") for p in state.iterdir()) if state.exists() else False
  if ocdbt and not (state / "manifest.ocdbt").exists():
    problems.append(f"{state_item}/manifest.ocdbt is missing (the index of the array files)")
  digests = None
  if saved_n is None:
    problems.append("no per-process files at all (neither completeness records nor input positions)")
  else:
    for i in range(saved_n):
      if ocdbt and not (state / f"ocdbt.process_{i}" / "manifest.ocdbt").exists():
        problems.append(f"{state_item}/ocdbt.process_{i}/manifest.ocdbt is missing (process {i}'s arrays)")
      if not legacy:
        record, error = _read_json(records_dir / record_name(i, saved_n))
        if error:
          problems.append(f"{INTEGRITY}/{error} (process {i}'s completeness record)")
        elif not isinstance(record, dict) or record.get("format") != FORMAT or "arrays" not in record:
          problems.append(f"{INTEGRITY}/{record_name(i, saved_n)} is not a completeness record")
        elif digests is None:
          digests = record["arrays"]
        elif record["arrays"] != digests:
          problems.append(f"{INTEGRITY}/{record_name(i, saved_n)} disagrees with process 0's record")
      if saved_n == process_count:
        _, error = _read_json(step_dir / data_item / record_name(i, saved_n))
        if error:
          problems.append(f"{data_item}/{error} (process {i}'s input position)")
  if legacy:
    notes.append("written before integrity records: array contents cannot be verified")
  if saved_n is not None and saved_n != process_count:
    notes.append(f"saved by {saved_n} processes, restoring on {process_count}: the input positions "
                 "cannot be mapped and the input pipeline starts from its beginning")
  return Inspection(problems, saved_n, digests, notes)


# ------------------------------------------------------------------ agreement

_ROUNDS = itertools.count()


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def agree(tag: str, value: Any, timeout_s: float) -> list:
  """Every process's JSON-able `value` for this round, in process order.

  Every process must call `agree` the same number of times in the same order
  (the rounds are numbered). With one process it returns `[value]`.

  Raises:
    CheckpointError: a process did not answer within `timeout_s` (named).
  """
  round_id = next(_ROUNDS)
  if jax.process_count() == 1:
    return [value]
  client = _client()
  prefix = f"metis_checkpoint/{round_id}/{tag}"
  client.key_value_set(f"{prefix}/{jax.process_index()}", json.dumps(value))
  out = []
  for p in range(jax.process_count()):
    try:
      out.append(json.loads(client.blocking_key_value_get(f"{prefix}/{p}", int(timeout_s * 1000))))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"process {p} did not report its {tag!r} verdict within {timeout_s:.0f} s "
                            f"(it died or hangs; {type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
  return out
