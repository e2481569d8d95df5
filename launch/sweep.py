r"""Expands a grid (or a list) of config overrides into named runs.

  python -m launch.sweep --config experiments/demo.py --root runs/sweep \
      --grid config.optimizer.learning_rate=1e-4,3e-4 \
      --grid config.data.train_episode.simclr_episode_fraction=0,0.5 --run

makes four runs with work dirs such as
`runs/sweep/learning_rate=1e-4,simclr_episode_fraction=0.5` (the last key
component names each override; `--name key=short` renames it, e.g.
`--name config.optimizer.learning_rate=lr`). `--list` adds one run per item
instead of a product: `--list 'config.seed=1;config.seed=2,config.x=3'` (runs
separated by `;`, overrides by `,`). A value holding a comma is written in
brackets or parentheses: `--grid config.data.train_sources=(a,b),(c,)`.

Every override is checked before anything starts, the way `ctx-train` parses
it (the config file is loaded and locked, and the overrides applied with
ml_collections' config flags): an unknown key or a bad value is an error
naming it. Then:

  (default)   print one command per run (`--launcher local|tpu|slurm` wraps
              each in that launcher, with `--launcher_args`);
  --run       run them here one after another; a run whose `results.json`
              exists is skipped, a failed run is reported and the others go
              on (exit status 1 if any failed).

`<root>/sweep.json` records every run (name, overrides, work dir, command);
`python -m launch.collect --root <root>` gathers their results in a table.
Extra `ctx-train` flags for every run go after `--`.
"""

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from typing import Sequence
import warnings

from etils import epath

from absl import flags as absl_flags
from ml_collections import config_flags

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.json"


def split_values(text: str) -> list[str]:
  """Splits on commas outside brackets/parentheses/quotes."""
  out, depth, quote, current = [], 0, None, []
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append("".join(current))
      current = []
      continue
    current.append(ch)
  out.append("".join(current))
  return [v.strip() for v in out]


def parse_override(item: str) -> tuple[str, str]:
  key, sep, value = item.partition("=")
  key = key.strip().removeprefix("--")
  if not sep or not key:
    raise ValueError(f"override {item!r} is not KEY=VALUE")
  if not key.startswith("config."):
    key = f"config.{key}"
  return key, value.strip()


def expand(grid: Sequence[str] = (), items: Sequence[str] = ()
           ) -> list[list[tuple[str, str]]]:
  """The runs: the product of `--grid` axes, then one run per `--list` item.

  Returns:
    One list of `(key, value)` overrides per run, in order.
  """
  axes = []
  for axis in grid:
    key, values = parse_override(axis)
    values = split_values(values)
    if not all(values):
      raise ValueError(f"--grid {axis!r} has an empty value")
    if any(key == k for k, _ in (a[0] for a in axes)):
      raise ValueError(f"--grid key {key} given twice")
    axes.append([(key, v) for v in values])
  runs = [list(combo) for combo in itertools.product(*axes)] if axes else []
  for item in items:
    for run in filter(None, (r.strip() for r in item.split(";"))):
      runs.append([parse_override(o) for o in split_values(run)])
  if not runs:
    raise ValueError("nothing to sweep: give --grid or --list")
  return runs


def validate(config_arg: str, overrides: Sequence[tuple[str, str]]) -> None:
  """Loads the config and applies `overrides` as `ctx-train` would.

  Raises:
    ValueError: naming the config or the override that fails.
  """
  values = absl_flags.FlagValues()
  argv = ["sweep", f"--config={config_arg}"] + [
      f"--{k}={v}" for k, v in overrides]
  # The override flags are defined from `sys_argv` while `--config` parses.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    with warnings.catch_warnings():
      # ml_collections loads the config file with the deprecated
      # `load_module`; ctx-train does the same.
      warnings.simplefilter("ignore", DeprecationWarning)
      values(argv)
    values["config"].value  # pylint: disable=pointless-statement
  except (absl_flags.Error, KeyError, AttributeError, TypeError,
          ValueError, OSError) as e:
    shown = ", ".join(f"{k}={v}" for k, v in overrides)
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise ValueError(f"invalid override in [{shown}] for {config_arg}: "
                     f"{message}") from e


def run_name(overrides: Sequence[tuple[str, str]],
             short: dict[str, str]) -> str:
  """`lr=1e-4,simclr=0.5`: short key names, filesystem-safe values."""
  last = [k.rsplit(".", 1)[-1] for k, _ in overrides]
  parts = []
  for (key, value), name in zip(overrides, last):
    if key in short:
      name = short[key]
    elif last.count(name) > 1:
      name = key.removeprefix("config.")
    value = value.replace("/", "_").replace(" ", "")
    parts.append(f"{name}={value}")
  return ",".join(parts)


def train_command(program: Sequence[str], config_arg: str, workdir: str,
                  overrides, extra: Sequence[str]) -> list[str]:
  return (list(program) + ["--config", config_arg, "--workdir", workdir] +
          [f"--{k}={v}" for k, v in overrides] + list(extra))


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m launch.sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="experiment config, as for ctx-train")
  parser.add_argument("--root", required=True, help="parent of the runs")
  parser.add_argument("--grid", action="append", default=[],
                      metavar="KEY=V1,V2")
  parser.add_argument("--list", action="append", default=[],
                      metavar="K=V,K2=V2;K=V3")
  parser.add_argument("--name", action="append", default=[],
                      metavar="KEY=SHORT", help="short name of a key in "
                      "run names")
  parser.add_argument("--program", default="ctx-train",
                      help="training command (default: ctx-train)")
  parser.add_argument("--launcher", choices=["none", "local", "tpu", "slurm"],
                      default="none")
  parser.add_argument("--launcher_args", default="",
                      help="arguments of the launcher, one string")
  parser.add_argument("--run", action="store_true",
                      help="run here one after another (default: print)")
  return parser


def plan(args, extra: Sequence[str]) -> list[dict]:
  """Validated runs: name, overrides, workdir, command."""
  short = dict(parse_override(n) for n in args.name)
  runs = expand(args.grid, args.list)
  root = epath.Path(args.root)
  out, names = [], set()
  for overrides in runs:
    validate(args.config, overrides)
    name = run_name(overrides, short)
    if name in names:
      raise ValueError(f"two runs are both named {name!r}")
    names.add(name)
    workdir = str(root / name)
    command = train_command(shlex.split(args.program), args.config, workdir,
                            overrides, extra)
    if args.launcher != "none":
      command = ([sys.executable, "-m", f"launch.{args.launcher}"] +
                 shlex.split(args.launcher_args) + ["--"] + command)
    out.append({"name": name, "overrides": dict(overrides),
                "workdir": workdir, "command": command})
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if (
      "--" in argv) else (argv, [])
  parser = make_parser()
  args = parser.parse_args(own)
  try:
    runs = plan(args, extra)
  except ValueError as e:
    print(f"launch.sweep: error: {e}", file=sys.stderr)
    return 2
  root = epath.Path(args.root)
  if not args.run:
    for run in runs:
      print(shlex.join(run["command"]))
    return 0
  root.mkdir(parents=True, exist_ok=True)
  (root / SWEEP_FILE).write_text(json.dumps(
      {"config": args.config, "runs": runs}, indent=2) + "\n")
  failed = []
  for i, run in enumerate(runs):
    if (epath.Path(run["workdir"]) / RESULTS_FILE).is_file():
      print(f"[{i + 1}/{len(runs)}] {run['name']}: done already, skipped",
            flush=True)
      continue
    print(f"[{i + 1}/{len(runs)}] {run['name']}: {shlex.join(run['command'])}",
          flush=True)
    code = subprocess.run(run["command"], check=False).returncode
    if code:
      print(f"[{i + 1}/{len(runs)}] {run['name']}: FAILED (status {code})",
            flush=True)
      failed.append(run["name"])
  print(f"sweep: {len(runs) - len(failed)}/{len(runs)} runs finished; "
        f"collect with: python -m launch.collect --root {args.root}")
  if failed:
    print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
