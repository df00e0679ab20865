r"""Runs one command as N JAX processes on this machine, over loopback (CPU collectives via gloo).

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \
      python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_mp

Each process gets METIS_COORDINATOR_ADDRESS (127.0.0.1 and a free port),
METIS_NUM_PROCESSES, METIS_PROCESS_ID (read by metis_jax/distributed.py),
JAX_PLATFORMS=cpu and its own XLA_FLAGS with the fake device count. Output
lines are prefixed with the process id. If one process fails (non-zero
status or killed by a signal) it is reported by id and status, the others get
SIGTERM and, after `--grace_s` seconds, SIGKILL; the exit status is the
first failure's (128 + signal for a signal). SIGTERM or Ctrl-C to the
launcher is passed on as SIGTERM to every process (the trainer then saves a
checkpoint and exits). Workers never outlive the launcher: on Linux each
asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so even
a SIGKILLed launcher takes them down. `--dry_run` prints the environment and
command of every process instead of running them.
"""

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, index: int, count: int, devices: int, coordinator: str) -> dict:
  """The environment of process `index`."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["METIS_COORDINATOR_ADDRESS"] = coordinator
  env["METIS_NUM_PROCESSES"] = str(count)
  env["METIS_PROCESS_ID"] = str(index)
  return env


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int):
  """A preexec_fn: SIGKILL this child when the launcher dies (Linux; a no-op elsewhere)."""
  def set_up() -> None:
    if sys.platform.startswith("linux"):
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
      if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os._exit(1)
  return set_up


def describe_status(code: int) -> str:
  """'status 7' or 'signal SIGKILL' for a Popen return code."""
  if code < 0:
    try:
      return f"signal {signal.Signals(-code).name}"
    except ValueError:
      return f"signal {-code}"
  return f"status {code}"


def shell_status(code: int) -> int:
  """A Popen return code as a shell exit status (128 + signal for a signal)."""
  return 128 - code if code < 0 else code


def _pump(index: int, stream, sink) -> None:
  for line in iter(stream.readline, ""):
    sink.write(f"[p{index}] {line}")
    sink.flush()


def launch(command: list, num_processes: int, devices_per_process: int, timeout: float = 0,
           dry_run: bool = False, grace_s: float = 10.0) -> int:
  """Starts the processes, streams their output, returns the job's exit status."""
  coordinator = f"127.0.0.1:{free_port()}"
  envs = [process_env(os.environ, i, num_processes, devices_per_process, coordinator)
          for i in range(num_processes)]
  if dry_run:
    keys = ("METIS_COORDINATOR_ADDRESS", "METIS_NUM_PROCESSES", "METIS_PROCESS_ID",
            "JAX_PLATFORMS", "XLA_FLAGS")
    for env in envs:
      print(" ".join(f"{k}={shlex.quote(env[k])}" for k in keys), shlex.join(command))
    return 0
  procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
           for env in envs]

  def forward(signum, frame):  # SIGTERM/SIGINT to the launcher reach every process
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  pumps = [threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  deadline = time.time() + timeout if timeout > 0 else None
  status = 0
  try:
    while [p.poll() for p in procs].count(None):  # poll every process (any() would stop at the first)
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed or (deadline and time.time() > deadline):
        if failed:
          index, code = failed[0]
          status = shell_status(code)
          print(f"launcher: process {index} exited with {describe_status(code)}; stopping the others "
                f"(SIGTERM, SIGKILL after {grace_s:.0f} s)", file=sys.stderr, flush=True)
        else:
          status = 124
          print(f"launcher: timeout after {timeout:.0f} s; stopping all processes", file=sys.stderr, flush=True)
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    stop_by = time.time() + grace_s
    for p in procs:
      try:
        p.wait(timeout=max(stop_by - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        _kill_group(p)
        p.wait()
    for p in procs:
      _kill_group(p)  # whatever a worker started (data loader processes) goes too
    for t in pumps:
      t.join(timeout=5)
  if status == 0:
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
      status = shell_status(failed[0][1])
      print(f"launcher: process {failed[0][0]} exited with {describe_status(failed[0][1])}",
            file=sys.stderr, flush=True)
  return status


def _kill_group(p: subprocess.Popen) -> None:
  """SIGKILLs the process group (session) the worker leads, if anything is left in it."""
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=0, help="seconds; 0 = none")
  parser.add_argument("--dry_run", action="store_true", help="print, do not run")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="seconds the others get to exit after SIGTERM when one process fails")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  return launch(command, args.num_processes, args.devices_per_process, args.timeout, args.dry_run,
                args.grace_s)


if __name__ == "__main__":
  sys.exit(main())
