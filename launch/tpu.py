r"""Starts the same program on every worker of a Cloud TPU VM pod slice.

  python -m launch.tpu --tpu my-v4-32 --zone us-central2-b \
      --remote_dir '~/ctx-jax' -- \
      ctx-train --config experiments/ctx_ilsvrc.py \
          --config.data.records_root=gs://my-bucket/records \
          --workdir gs://my-bucket/runs/ctx

runs one `gcloud compute tpus tpu-vm ssh <tpu> --worker=all --command ...`:
every worker changes to `--remote_dir`, gets CTX_JAX_DISTRIBUTED=1 (plus any
`--env`), and runs the program, which calls `jax.distributed.initialize()`;
on Cloud TPU that auto-detects the coordinator, the process count and the
process ids. The code must be on the workers (`--setup` runs a command first
on every worker, e.g. a `git pull` and `pip install -e .`); records and the
work dir can be in a bucket, read and written through TensorFlow's file
systems and orbax:

  gs://my-bucket/records/<source>/dataset_spec.json, <class>.tfrecords
  gs://my-bucket/runs/ctx/  ckpt/<step>/, best/, export/, results.json,
                            config.json, TensorBoard events

Each worker also gets GCS_READ_CACHE_BLOCK_SIZE_MB=1 unless its environment
or `--env` sets it (TF's 64 MB default block costs a 64 MB fetch per record
read by offset). The JAX compilation cache of a multi-process run defaults to
`<workdir>/compilation_cache`: on the bucket, every worker reads what worker
0 wrote, so a restarted run compiles nothing; `--cache_dir` puts it
elsewhere (any path every worker reaches).

`--dry_run` prints the exact gcloud command.
"""

import argparse
import shlex
import subprocess
import sys

from launch import common


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m launch.tpu", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--worker", default="all",
                      help="workers to run on (default: all)")
  parser.add_argument("--remote_dir", default="~/ctx-jax",
                      help="checkout on the workers")
  parser.add_argument("--setup", default=None,
                      help="shell command run first on every worker")
  parser.add_argument("--env", action="append", metavar="NAME=VALUE",
                      help="extra environment on every worker")
  parser.add_argument("--cache_dir", default=None,
                      help="JAX compilation cache every worker reads, passed "
                      "as --config.compilation_cache_dir (default: the "
                      "program's: <workdir>/compilation_cache, on the bucket "
                      "with a gs:// work dir)")
  parser.add_argument("--dry_run", action="store_true",
                      help="print the gcloud command, run nothing")
  return parser


# Worker settings used unless the worker's environment or --env sets them.
# TensorFlow's GCS reader fetches GCS_READ_CACHE_BLOCK_SIZE_MB (64 MB by
# default) per read; the pipeline reads single records by offset: 1 MB took
# 18 ms per 100-byte read against 200 ms at 64 MB on the loopback emulator,
# and 250 against 82 img/s (launch/README.md; not measured on a bucket).
REMOTE_DEFAULTS = {"GCS_READ_CACHE_BLOCK_SIZE_MB": "1"}


def remote_command(args) -> str:
  env = {common.DISTRIBUTED_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
  user = common.parse_env(args.env)
  env.update(user)
  defaults = " ".join(f'{k}="${{{k}:-{v}}}"'
                      for k, v in sorted(REMOTE_DEFAULTS.items())
                      if k not in user)
  command = list(args.command)
  if args.cache_dir:
    command.append(f"--config.compilation_cache_dir={args.cache_dir}")
  # `~` must stay unquoted to expand on the worker.
  remote_dir = args.remote_dir
  cd = (f"cd {remote_dir}" if remote_dir.startswith("~") and
        " " not in remote_dir else f"cd {shlex.quote(remote_dir)}")
  parts = [cd]
  if args.setup:
    parts.append(args.setup)
  parts.append(" ".join(filter(None, (defaults, common.env_assignments(env),
                                      common.quote(command)))))
  return " && ".join(parts)


def gcloud_command(args) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu,
         f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  cmd += [f"--worker={args.worker}", f"--command={remote_command(args)}"]
  return cmd


def main(argv=None) -> int:
  parser = make_parser()
  args = common.parse(parser, sys.argv[1:] if argv is None else argv)
  try:
    cmd = gcloud_command(args)
  except ValueError as e:
    parser.error(str(e))
  if args.dry_run:
    print(common.quote(cmd))
    return 0
  return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
