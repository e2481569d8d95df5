"""Plain command-line behaviour shared by every console script.

A user error (missing or unwritable path, mistyped config key, corrupt
record, bad checkpoint, bad flag) ends the command with ONE line on stderr,
`<command>: error: <what, naming the file, class or key>`, and exit status 1;
the Python traceback is shown only with `--verbose`. `--help` describes the
job and lists the command's own flags with their defaults, exit status 0.

Never imports JAX or TensorFlow (TF errors are recognised by class name).
"""

import argparse
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-?")


class UserError(Exception):
  """An error of the user's making whose message says what to fix."""


def _is_tf_error(e: BaseException) -> bool:
  """tf.errors.OpError (DataLossError on a corrupt record, NotFoundError...)."""
  return any(c.__name__ == "OpError" and c.__module__.startswith("tensorflow")
             for c in type(e).__mro__)


def is_user_error(e: BaseException) -> bool:
  """Errors whose message is enough for the user (no traceback needed)."""
  return isinstance(e, (UserError, OSError, ValueError, KeyError,
                        FloatingPointError, NotImplementedError,
                        AttributeError)) or _is_tf_error(e)


def one_line(e: BaseException) -> str:
  """The error's message on one line (TF errors: their own message)."""
  text = getattr(e, "message", None) if _is_tf_error(e) else None
  if text and "Traceback (most recent call last)" in text:
    # A Python error raised inside tf.data (the episode generator): TF
    # wraps its traceback between node names; keep the error's own line.
    raised = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$",
                        text, flags=re.M)
    if raised:
      text = raised[-1][1]
  text = text or (str(e.args[0]) if isinstance(e, KeyError) and e.args
                  else str(e))
  # ml_collections wraps a KeyError's repr in an AttributeError.
  text = text.replace("\\n", "\n").replace("\\'", "'")
  if "Traceback (most recent call last)" in text:
    # config_flags embeds the traceback of an error in get_config: keep the
    # flag it names and the exception's last line.
    lines = [l for l in text.splitlines() if l.strip()]
    text = f"{lines[0].split(':', 1)[0]}: {lines[-1]}"
  text = re.sub(r"\s+", " ", text).strip()
  if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
    text = f"{text}: {e.filename}"
  return text or type(e).__name__


def fail(prog: str, e: BaseException | str, verbose: bool = False,
         message: str | None = None):
  """Prints `prog: error: ...` (traceback first if `verbose`), exits 1."""
  if verbose and isinstance(e, BaseException):
    traceback.print_exception(e)
  if message is None:
    message = e if isinstance(e, str) else one_line(e)
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def guarded(prog: str, fn: Callable[[], Any], verbose: bool = False) -> Any:
  """Runs `fn()`; a user error becomes one line and exit status 1."""
  try:
    return fn()
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    fail(prog, e, verbose)


def wants_verbose(argv: Sequence[str]) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=1")
             for a in argv)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with defaults in `--help`, `--verbose`, one-line errors.

  A bad flag prints `prog: error: ...` (and where to get help) and exits 1,
  where argparse prints the whole usage and exits 2.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", _HelpFormatter)
    super().__init__(*args, **kwargs)
    self.add_argument("--verbose", action="store_true",
                      help="show the Python traceback of an error")

  def error(self, message):
    fail(self.prog, f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
  """Keeps the description's layout and shows every flag's default."""

  def _get_help_string(self, action):
    text = action.help or ""
    # Not when the help already says what the default is.
    if ("default" not in text and action.default is not argparse.SUPPRESS
        and action.option_strings and not isinstance(
            action, (argparse._StoreTrueAction, argparse._HelpAction))):  # pylint: disable=protected-access
      text += " (default: %(default)s)"
    return text


def absl_flags_parser(prog: str, description: str,
                      modules: Sequence[str]) -> Callable[[list[str]],
                                                          list[str]]:
  """A `flags_parser` for `absl.app.run`: short help, one-line flag errors.

  `--help` (and `-h`, `--helpshort`) prints `description` and the flags of
  `modules` with their defaults, exit status 0 (`--helpfull` still lists
  every flag). A bad flag or config override (unknown key, missing config
  file, bad value) prints one `prog: error:` line naming it, exit status 1.

  Args:
    prog: the command's name.
    description: what the command does (module docstring).
    modules: names of the modules that define its own flags.

  Returns:
    The parser, argv -> remaining argv.
  """

  def parse(argv: list[str]) -> list[str]:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if any(a in HELP_ARGS for a in argv[1:]):
      print(description.strip() + "\n\nflags (--helpfull for all):")
      known = flags.FLAGS.flags_by_module_dict()
      for module in modules:
        if module not in known and "__main__" in known:
          module = "__main__"  # Run as `python -m <module>`.
        text = flags.FLAGS.module_help(module)
        print(text.split("\n", 1)[1] if "\n" in text else text)
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError,
            OSError) as e:
      fail(prog, e, wants_verbose(argv), _flag_message(e, argv))

  return parse


def _flag_message(e: BaseException, argv: Sequence[str]) -> str:
  """The flag error, naming the `--config.` override it came from."""
  text = one_line(e)
  if isinstance(e, (AttributeError, KeyError)):
    key = re.search(r"'([^'\s]+)'", text)
    culprit = next((a.split("=", 1)[0] for a in argv
                    if a.startswith("--config.") and key
                    and key.group(1) in a.split("=", 1)[0]), None)
    if culprit:
      hint = re.search(r'Did you mean "([^"]+)"', text)
      return (f"unknown config key {key.group(1)!r} in {culprit}"
              + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
  return text


def quiet_tensorflow() -> None:
  """TF's C++ start-up logging off unless the user set the level."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
