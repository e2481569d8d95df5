r"""Writes (and submits) an sbatch script for a SLURM cluster of GPU nodes.

  python -m launch.slurm --nodes 4 --gpus_per_node 8 --partition gpu \
      --time 48:00:00 --job_name ctx -- \
      ctx-train --config experiments/ctx_ilsvrc.py \
          --config.data.records_root=/data/records --workdir runs/ctx

writes `<job_name>.sbatch` (or `--script`) and runs `sbatch` on it. The job
starts one task per GPU (default; `--tasks per_node` starts one per node that
sees all its GPUs) with `srun`, and exports CTX_JAX_DISTRIBUTED=1: the program
calls `jax.distributed.initialize()`, which reads the coordinator, process
count and ids from SLURM's environment (JAX's SLURM auto-detection; with one
task per GPU it also binds each task to GPU $SLURM_LOCALID). `--dry_run`
prints the script and the sbatch command, and writes and submits nothing.
"""

import argparse
import os
import pathlib
import shlex
import subprocess
import sys

from launch import common


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m launch.slurm", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--tasks", choices=["per_gpu", "per_node"],
                      default="per_gpu")
  parser.add_argument("--cpus_per_task", type=int, default=None,
                      help="default: 8 per task (tf.data decodes images)")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--time", default="24:00:00")
  parser.add_argument("--job_name", default="ctx-jax")
  parser.add_argument("--log_dir", default="slurm_logs")
  parser.add_argument("--workdir_on_nodes", default=None,
                      help="cd here on the nodes (default: this directory)")
  parser.add_argument("--setup", default=None,
                      help="shell lines run before srun, e.g. `source "
                      "venv/bin/activate`")
  parser.add_argument("--env", action="append", metavar="NAME=VALUE")
  parser.add_argument("--script", default=None,
                      help="where to write the script (default: "
                      "<job_name>.sbatch)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the script and command, do nothing")
  return parser


def make_script(args) -> str:
  """The sbatch script text."""
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise ValueError("--nodes and --gpus_per_node must be at least 1")
  per_gpu = args.tasks == "per_gpu"
  tasks_per_node = args.gpus_per_node if per_gpu else 1
  cpus = args.cpus_per_task or (8 if per_gpu else 8 * args.gpus_per_node)
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={tasks_per_node}",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={cpus}",
           f"#SBATCH --time={args.time}",
           f"#SBATCH --output={args.log_dir}/%x-%j.out"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  env = {common.DISTRIBUTED_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "2",
         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
  if not per_gpu:
    # JAX's SLURM detection would give each task only GPU $SLURM_LOCALID.
    env["CTX_JAX_LOCAL_DEVICE_IDS"] = ",".join(
        str(i) for i in range(args.gpus_per_node))
  env.update(common.parse_env(args.env))
  workdir = args.workdir_on_nodes or os.getcwd()
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(workdir)}"]
  if args.setup:
    lines.append(args.setup)
  lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
  # Several tasks per node: TensorFlow's thread pools (which bound tf.data's
  # parallelism) sized to the task's cores, not the node's; the submitting
  # environment and --env win.
  lines += [f'export {k}="${{{k}:-{cpus}}}"'
            for k in ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")
            if k not in env]
  lines += ["", "srun --kill-on-bad-exit=1 " + common.quote(args.command), ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = make_parser()
  args = common.parse(parser, sys.argv[1:] if argv is None else argv)
  try:
    script = make_script(args)
  except ValueError as e:
    parser.error(str(e))
  path = pathlib.Path(args.script or f"{args.job_name}.sbatch")
  if args.dry_run:
    print(f"# {path}\n{script}")
    print(f"# would run: mkdir -p {shlex.quote(args.log_dir)} && sbatch "
          f"{shlex.quote(str(path))}")
    return 0
  path.write_text(script)
  pathlib.Path(args.log_dir).mkdir(parents=True, exist_ok=True)
  print(f"wrote {path}")
  return subprocess.run(["sbatch", str(path)], check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
