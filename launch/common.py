"""Helpers shared by the launchers: the command after `--`, quoting."""

import argparse
import shlex
from typing import Sequence

# Environment every launcher sets for a multi-process run: the program then
# calls `jax.distributed.initialize` (see ctx_jax/distributed.py).
DISTRIBUTED_ENV = "CTX_JAX_DISTRIBUTED"


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `[launcher args] -- [program and its args]`."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  i = argv.index("--")
  return argv[:i], argv[i + 1:]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]):
  """Parses launcher flags; the program after `--` lands in `args.command`."""
  own, command = split_command(argv)
  args = parser.parse_args(own)
  if not command:
    parser.error("missing program: put it after `--`, e.g. "
                 "`-- ctx-train --config experiments/demo.py --workdir w`")
  args.command = command
  return args


def quote(command: Sequence[str]) -> str:
  return shlex.join(list(command))


def env_assignments(env: dict[str, str]) -> str:
  """`K=V K2=V2` with shell quoting, sorted by name."""
  return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items()))


def parse_env(items: Sequence[str] | None) -> dict[str, str]:
  """`["K=V", ...]` -> dict, with a clear error for a malformed item."""
  out = {}
  for item in items or ():
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise ValueError(f"--env expects NAME=VALUE, got {item!r}")
    out[name] = value
  return out
