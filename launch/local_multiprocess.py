r"""Runs one command as N JAX processes on this machine, over loopback (CPU collectives via gloo).

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \
      python -m metis_jax.train --config configs/tiny.py --workdir /tmp/metis_mp

Each process gets METIS_COORDINATOR_ADDRESS (127.0.0.1 and a free port),
METIS_NUM_PROCESSES, METIS_PROCESS_ID (read by metis_jax/distributed.py),
JAX_PLATFORMS=cpu and its own XLA_FLAGS with the fake device count. Output
lines are prefixed with the process id. If one process fails the others are
stopped; the exit status is the first non-zero one. SIGTERM or Ctrl-C to the
launcher is passed on as SIGTERM to every process (the trainer then saves a
checkpoint and exits). `--dry_run` prints the environment and command of
every process instead of running them.
"""

import argparse
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


def _pump(index: int, stream, sink) -> None:
  for line in iter(stream.readline, ""):
    sink.write(f"[p{index}] {line}")
    sink.flush()


def launch(command: list, num_processes: int, devices_per_process: int, timeout: float = 0,
           dry_run: bool = False) -> int:
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
                            text=True, start_new_session=True) for env in envs]

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
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed or (deadline and time.time() > deadline):
        status = failed[0] if failed else 124
        print(f"stopping all processes ({'a process failed' if failed else 'timeout'})",
              file=sys.stderr)
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return status


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=0, help="seconds; 0 = none")
  parser.add_argument("--dry_run", action="store_true", help="print, do not run")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  return launch(command, args.num_processes, args.devices_per_process, args.timeout, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
