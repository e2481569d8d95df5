"""XLA settings the project applies by default: CPU convolutions, cache.

**CPU convolutions.** jaxlib 0.10's XLA:CPU sends convolutions to YNNPACK by
default. On the CTX train step (ResNet-34 stride 16, 84 and 126 px) its
convolutions, and above all their filter gradients, take about 1.5x the
CPU time of XLA's Eigen convolutions (benchmarks/RESULTS.md, "Train step
against the official"), so `--xla_cpu_experimental_ynn_fusion_type=
-individual_convolution` is added to `XLA_FLAGS` when `ctx_jax` is imported.
The flag is experimental and specific to the jaxlib versions listed in
`_CPU_CONV_FLAG_JAXLIB`: XLA aborts the process at start-up on a flag it
does not know, so on any other jaxlib nothing is added. It only affects the
CPU backend, and only if it is set before JAX starts its backends, so import
`ctx_jax` before the first JAX computation. A user's own setting of the same
flag in `XLA_FLAGS` wins; `CTX_JAX_XLA_DEFAULTS=0` turns all of this off
(do so for float64 reference runs: in float64, Eigen's convolutions took
2m25s against YNNPACK's 18s for the official fixture episode).

**Persistent compilation cache.** `enable_compilation_cache` points JAX's
persistent cache at a folder (default: `$XDG_CACHE_HOME/ctx_jax/jax_cache`,
i.e. `~/.cache/ctx_jax/jax_cache`), so a restarted or resumed run, and every
later run with the same shapes, loads its compiled steps instead of
compiling them again. JAX writes entries atomically, so several processes
(multi-host runs, sweeps) may share the folder.
"""

import importlib.metadata
import os

CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
# jaxlib versions (prefixes) whose XLA knows the flag and where it was
# measured to help.
_CPU_CONV_FLAG_JAXLIB = ('0.10.',)
_OPT_OUT = 'CTX_JAX_XLA_DEFAULTS'


def jaxlib_version() -> str:
  """The installed jaxlib's version, read without importing it."""
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def default_xla_flags(environ=None, version: str | None = None) -> str | None:
  """Adds the project's default XLA:CPU flag to `environ['XLA_FLAGS']`.

  Args:
    environ: the environment to edit (default `os.environ`).
    version: the jaxlib version (default: the installed one).

  Returns:
    The flag added, or None when nothing was added (unknown jaxlib version,
    the user set the same XLA option, or `CTX_JAX_XLA_DEFAULTS=0`).
  """
  environ = os.environ if environ is None else environ
  version = jaxlib_version() if version is None else version
  if environ.get(_OPT_OUT, '1') == '0':
    return None
  if not version.startswith(_CPU_CONV_FLAG_JAXLIB):
    return None
  flags = environ.get('XLA_FLAGS', '')
  if CPU_CONV_FLAG.split('=', 1)[0] in flags:
    return None
  environ['XLA_FLAGS'] = f'{flags} {CPU_CONV_FLAG}'.strip()
  return CPU_CONV_FLAG


def default_cache_dir() -> str:
  """`$XDG_CACHE_HOME/ctx_jax/jax_cache` (default `~/.cache/...`)."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'ctx_jax', 'jax_cache')


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory`.

  Args:
    directory: the cache folder; '' or None means `default_cache_dir()`,
      'none' turns the cache off (returns None).

  Returns:
    The folder used, or None when the cache is off.
  """
  # Imported here: `ctx_jax` imports this module before anything else, and
  # the commands' start-up checks run before JAX is loaded.
  import jax  # pylint: disable=g-import-not-at-top
  if directory and directory.lower() == 'none':
    return None
  directory = directory or default_cache_dir()
  if '://' not in directory:
    os.makedirs(directory, exist_ok=True)
  else:
    # XLA's own GPU autotune cache writes beside the entries with local file
    # APIs, which cannot reach a gs:// folder.
    jax.config.update('jax_persistent_cache_enable_xla_caches', 'none')
  jax.config.update('jax_compilation_cache_dir', directory)
  # Every train/eval step is worth keeping (the default keeps only compiles
  # over 1 s, which the tiny test configs do not reach).
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory
