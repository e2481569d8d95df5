r"""Runs a program on this host: one process, or N cooperating processes.

(a) One host, several GPUs: by default one process per GPU (its own
tf.data reading threads; they feed better than one process for all GPUs),
each with CUDA_VISIBLE_DEVICES set to its GPU, 90% of that GPU's memory
(XLA_PYTHON_CLIENT_MEM_FRACTION) and TensorFlow's thread pools, which bound
tf.data's parallelism, capped at cores / processes (TF_NUM_INTEROP_THREADS,
TF_NUM_INTRAOP_THREADS); settings already in the environment win. The GPUs
are CUDA_VISIBLE_DEVICES or those `nvidia-smi -L` lists (`--num_gpus`).

  python -m launch.local -- ctx-train --config experiments/ctx_ilsvrc.py \
      --workdir runs/ctx

  `--num_processes 1` runs one process over all GPUs instead, with (unless
  already set) XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (let JAX take most GPU
  memory; TF runs tf.data on the host and is kept off the GPUs by the
  program itself) and TF_CPP_MIN_LOG_LEVEL=2.

(b) N processes on this host (tests, or one process per GPU): each gets
CTX_JAX_DISTRIBUTED=1, the coordinator 127.0.0.1:<free port>, its process id
and the process count, so the program calls `jax.distributed.initialize`. On
CPU (`--platform cpu`) each process gets `--cpu_devices` fake devices; on GPU
`--gpus_per_process` assigns disjoint CUDA_VISIBLE_DEVICES.

  python -m launch.local --num_processes 2 --platform cpu --cpu_devices 2 \
      -- ctx-train --config experiments/demo.py:smoke --workdir runs/two

Output lines are prefixed `[p<i>]`. If one process fails, the others are
stopped and the launcher exits with that process's status. A SIGTERM to the
launcher (a scheduler's preemption) is passed on to every process, which
ctx-train answers by checkpointing at one common step and exiting with 143;
the launcher waits for that (`--grace_s`, default 600 s, before SIGKILL)
and exits with their status (143: run the same command again to resume).
Ctrl-C does the same and exits with 130. `--dry_run` prints exactly the
environment and command of every process, and runs nothing.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch import common

SINGLE_PROCESS_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",
                      "TF_CPP_MIN_LOG_LEVEL": "2"}


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m launch.local", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=None,
                      help="default: one per GPU on a host with several "
                      "GPUs (see --num_gpus), else 1")
  parser.add_argument("--num_gpus", type=int, default=None,
                      help="GPUs of this host (default: CUDA_VISIBLE_DEVICES"
                      ", else `nvidia-smi -L`, else 0)")
  parser.add_argument("--platform", choices=["auto", "cpu", "gpu"],
                      default="auto", help="cpu sets JAX_PLATFORMS=cpu and "
                      "the fake device count per process")
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="devices per process with --platform cpu")
  parser.add_argument("--gpus_per_process", type=int, default=0,
                      help="GPUs per process (disjoint CUDA_VISIBLE_DEVICES)"
                      "; 0 leaves the GPUs to JAX's defaults")
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port (default: a free one)")
  parser.add_argument("--env", action="append", metavar="NAME=VALUE",
                      help="extra environment for every process")
  parser.add_argument("--grace_s", type=float, default=600.0,
                      help="on SIGTERM / Ctrl-C: seconds the processes get "
                      "to checkpoint and exit before SIGKILL")
  parser.add_argument("--dry_run", action="store_true",
                      help="print what would run, run nothing")
  return parser


def visible_gpus(environ=None) -> list[str]:
  """This host's GPU ids as CUDA numbers them for a child process."""
  environ = os.environ if environ is None else environ
  if "CUDA_VISIBLE_DEVICES" in environ:
    ids = [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",")]
    return [] if ids[:1] in ([""], ["-1"]) else ids
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                         text=True, timeout=30, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(
      l for l in out.splitlines() if l.startswith("GPU "))]


def resolve_processes(args) -> None:
  """Fills in the default process layout: one process per GPU.

  One process per GPU feeds a multi-GPU host better than one process for
  all of them (each has its own tf.data reading threads; benchmarks/
  RESULTS.md), so without `--num_processes` a host with several GPUs
  (`--num_gpus`, default: detected) gets one process per GPU.
  """
  gpus = (None if args.platform == "cpu" else
          [str(i) for i in range(args.num_gpus)] if args.num_gpus is not None
          else visible_gpus())
  args.gpu_ids = gpus or []
  if args.num_processes is None:
    if len(args.gpu_ids) > 1 and not args.gpus_per_process:
      args.num_processes, args.gpus_per_process = len(args.gpu_ids), 1
    else:
      args.num_processes = 1


def several_per_host_env(args, cpu_count=None) -> dict[str, str]:
  """Settings several processes on one GPU host need (user's env wins).

  Device memory: each process may take 90% of its own GPUs, or its share of
  90% when processes share GPUs. tf.data: TensorFlow's thread pools, whose
  size bounds tf.data's AUTOTUNE parallelism, get this host's cores divided
  by the processes instead of all cores each (oversubscription).
  """
  cpus = cpu_count or os.cpu_count() or 1
  fraction = 0.9 if args.gpus_per_process else 0.9 / args.num_processes
  threads = str(max(2, cpus // args.num_processes))
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3g}",
         "TF_NUM_INTEROP_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads,
         "TF_CPP_MIN_LOG_LEVEL": "2"}
  return {k: v for k, v in env.items() if k not in os.environ}


def process_envs(args) -> list[dict[str, str]]:
  """The environment additions of each process."""
  if not hasattr(args, "gpu_ids"):
    resolve_processes(args)
  if args.num_processes < 1:
    raise ValueError("--num_processes must be at least 1")
  if args.gpus_per_process and args.gpu_ids and (
      args.num_processes * args.gpus_per_process > len(args.gpu_ids)):
    raise ValueError(
        f"{args.num_processes} processes x {args.gpus_per_process} GPUs need "
        f"{args.num_processes * args.gpus_per_process} GPUs; this host has "
        f"{len(args.gpu_ids)}")
  extra = common.parse_env(args.env)
  envs = []
  port = args.port or free_port()
  for i in range(args.num_processes):
    env = {}
    if args.num_processes == 1:
      env.update({k: v for k, v in SINGLE_PROCESS_ENV.items()
                  if k not in os.environ})
    else:
      env.update({common.DISTRIBUTED_ENV: "1",
                  "CTX_JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                  "CTX_JAX_NUM_PROCESSES": str(args.num_processes),
                  "CTX_JAX_PROCESS_ID": str(i)})
      if args.platform != "cpu":
        env.update(several_per_host_env(args))
    if args.platform == "cpu":
      flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      flags.append(
          f"--xla_force_host_platform_device_count={args.cpu_devices}")
      env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags),
                  "JAX_NUM_CPU_DEVICES": str(args.cpu_devices)})
    if args.gpus_per_process:
      first = i * args.gpus_per_process
      ids = args.gpu_ids or [str(g) for g in range(
          args.num_processes * args.gpus_per_process)]
      env["CUDA_VISIBLE_DEVICES"] = ",".join(
          ids[first:first + args.gpus_per_process])
    env.update(extra)
    envs.append(env)
  return envs


def describe(envs, command) -> str:
  lines = []
  for i, env in enumerate(envs):
    lines.append(f"[p{i}] {common.env_assignments(env)} "
                 f"{common.quote(command)}".replace("]  ", "] "))
  return "\n".join(lines)


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


class Terminated(Exception):
  """The launcher got SIGTERM (raised by the handler `main` installs)."""


def run_processes(envs, command, out=None, grace_s: float = 10.0,
                  stop_grace_s: float = 600.0) -> int:
  """Starts one process per env, streams prefixed output, returns status.

  The first non-zero exit stops the others (SIGTERM, then SIGKILL after
  `grace_s`) and becomes the return value. On `Terminated` (SIGTERM) or
  Ctrl-C every process gets SIGTERM and `stop_grace_s` to checkpoint and
  exit; the return value is then 137 if one had to be killed, else the
  first positive status among them (ctx-train: 143), else 143 / 130.
  """
  out = out or sys.stdout
  procs, pumps = [], []
  try:
    for i, env in enumerate(envs):
      proc = subprocess.Popen(
          command, env=dict(os.environ, **env), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True, bufsize=1,
          start_new_session=True)
      procs.append(proc)
      prefix = f"[p{i}] " if len(envs) > 1 else ""
      pump = threading.Thread(target=_pump, args=(proc.stdout, prefix, out),
                              daemon=True)
      pump.start()
      pumps.append(pump)
    status = 0
    running = set(range(len(procs)))
    while running:
      for i in sorted(running):
        code = procs[i].poll()
        if code is None:
          continue
        running.discard(i)
        if code != 0 and status == 0:
          status = code
          out.write(f"launch.local: process {i} exited with status {code}; "
                    "stopping the others\n")
          _stop([procs[j] for j in running], grace_s)
      time.sleep(0.05)
    return status
  except (Terminated, KeyboardInterrupt) as e:
    default = 143 if isinstance(e, Terminated) else 130
    if threading.current_thread() is threading.main_thread():
      # A second signal must not cut the wait for the checkpoints short.
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    out.write(f"launch.local: {'SIGTERM' if default == 143 else 'Ctrl-C'}: "
              f"stopping {len(procs)} process(es) (up to {stop_grace_s:g} s "
              "to checkpoint)\n")
    _stop(procs, stop_grace_s)
    codes = [p.returncode for p in procs]
    if any(c == -signal.SIGKILL for c in codes):
      return 128 + signal.SIGKILL  # Killed after the grace period.
    # A process that ended on the signal itself reports -15 / -2.
    return next((c for c in codes if c is not None and c > 0), default)
  finally:
    for pump in pumps:
      pump.join(timeout=5)


def _stop(procs, grace_s: float) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def main(argv=None) -> int:
  parser = make_parser()
  args = common.parse(parser, sys.argv[1:] if argv is None else argv)
  try:
    envs = process_envs(args)
  except ValueError as e:
    parser.error(str(e))
  if args.dry_run:
    print(describe(envs, args.command))
    return 0

  def terminate(signum, frame):
    del signum, frame
    raise Terminated
  # A scheduler's SIGTERM is passed on to the processes (see run_processes).
  signal.signal(signal.SIGTERM, terminate)
  return run_processes(envs, args.command, stop_grace_s=args.grace_s)


if __name__ == "__main__":
  sys.exit(main())
