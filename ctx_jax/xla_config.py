"""XLA settings the project applies by default: CPU convolutions, cache.

**CPU convolutions, chosen by measurement per jaxlib.** jaxlib 0.10 to 0.12
send XLA:CPU's convolutions to YNNPACK by default. On the CTX train step
(ResNet-34 stride 16) its convolutions, above all their filter gradients,
take 1.8x (jaxlib 0.10) to 2.6x (0.12) the CPU time of XLA's Eigen
convolutions, and the whole step 2.1x on jaxlib 0.12. `MEASURED_CPU_CONV`
gives, for each jaxlib release that was measured
(`benchmarks/conv_kernels_bench.py` and the train step against the
official, `benchmarks/official_step_bench.py`; figures in
`benchmarks/RESULTS.md`, "Supported JAX versions"), the fastest setting of
`CPU_CONV_SETTINGS` that keeps the official-fixture tests within their
tolerances; importing `ctx_jax` adds its flag to `XLA_FLAGS`.

XLA aborts the process at start-up on a flag it does not know, so a flag is
only ever set where the installed jaxlib has it. A jaxlib release not in the
table (a future one) gets a safe default: the setting of the newest
measured release if the jaxlib's native library still defines that flag
(`jaxlib_knows_flag`, a search of the library file, nothing is imported),
else jaxlib's own kernels (no flag); which one was used is logged as a
warning. A jaxlib older than the table gets no flag.

The flag only affects the CPU backend, and only if it is set before JAX
starts its backends, so import `ctx_jax` before the first JAX computation.
A user's own setting of the same XLA option in `XLA_FLAGS` wins;
`CTX_JAX_XLA_DEFAULTS=0` turns all of this off (do so for float64 reference
runs: in float64, Eigen's convolutions took 2m25s against YNNPACK's 18s for
the official fixture episode on jaxlib 0.10). `applied()` says what was
decided in this process.

**Persistent compilation cache.** `enable_compilation_cache` points JAX's
persistent cache at a folder (default: `$XDG_CACHE_HOME/ctx_jax/jax_cache`,
i.e. `~/.cache/ctx_jax/jax_cache`), so a restarted or resumed run, and every
later run with the same shapes, loads its compiled steps instead of
compiling them again. JAX writes entries atomically, so several processes
(multi-host runs, sweeps) may share the folder.
"""

import dataclasses
import importlib.metadata
import importlib.util
import logging
import mmap
import os
import pathlib
import re
from typing import Callable

# XLA:CPU convolution settings: name -> the flag that selects it (None:
# jaxlib's own choice, YNNPACK on jaxlib 0.10 to 0.12).
CPU_CONV_SETTINGS = {
    'jaxlib': None,
    'eigen': '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
}
CPU_CONV_FLAG = CPU_CONV_SETTINGS['eigen']

# Measured: jaxlib (major, minor) -> the setting used. CPU seconds of the
# convolutions of one episode-b training step (ResNet-34 stride 16, 200
# images at 84 px, forward + both gradients; conv_kernels_bench.jsonl),
# jaxlib's own (YNNPACK) / Eigen / TF's oneDNN 8.42; and the whole step's
# CPU seconds against the official's (official_step_bench_versions*.json).
# Medians of interleaved rounds on a shared 2-vCPU Intel Xeon (load 3-10):
# benchmarks/RESULTS.md, "Supported JAX versions".
#   jaxlib 0.10.2:   convolutions 17.32 / 9.76 s; step 1.19x the official.
#   jaxlib 0.11.2:   convolutions 21.54 / 9.41 s; step 1.13x.
#   jaxlib 0.12.0.1: convolutions 23.45 / 9.03 s; step 1.35x (YNNPACK:
#                    2.53x).
# Eigen keeps the official-fixture tests within tolerance on all three.
MEASURED_CPU_CONV = {
    (0, 10): 'eigen',
    (0, 11): 'eigen',
    (0, 12): 'eigen',
}
_OPT_OUT = 'CTX_JAX_XLA_DEFAULTS'
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CpuConvChoice:
  """The convolution setting chosen for a jaxlib version, and why."""
  setting: str  # A key of CPU_CONV_SETTINGS.
  flag: str | None  # Its flag (None: nothing to add).
  measured: bool  # The version is in MEASURED_CPU_CONV.
  reason: str


_APPLIED: dict[str, object] = {}


def jaxlib_version() -> str:
  """The installed jaxlib's version, read without importing it."""
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def _major_minor(version: str) -> tuple[int, int] | None:
  match = re.match(r'(\d+)\.(\d+)', version)
  return (int(match[1]), int(match[2])) if match else None


def jaxlib_knows_flag(flag: str) -> bool:
  """Whether the installed jaxlib's native libraries define `flag`.

  XLA's flag names are strings in its shared libraries; searching them
  tells whether XLA would accept the flag without starting XLA (which
  aborts on an unknown one) or importing jaxlib.

  Args:
    flag: e.g. `--xla_cpu_experimental_ynn_fusion_type=...`; only the name
      (before `=`, without dashes) is searched.
  """
  name = flag.split('=', 1)[0].lstrip('-').encode()
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    return False
  for folder in spec.submodule_search_locations:
    for path in pathlib.Path(folder).rglob('*.so*'):
      try:
        with open(path, 'rb') as f, mmap.mmap(
            f.fileno(), 0, access=mmap.ACCESS_READ) as data:
          if data.find(name) >= 0:
            return True
      except (OSError, ValueError):  # Unreadable, or empty (mmap refuses).
        continue
  return False


def cpu_conv_choice(
    version: str,
    knows_flag: Callable[[str], bool] = jaxlib_knows_flag) -> CpuConvChoice:
  """The convolution setting for jaxlib `version` (see the module doc)."""
  key = _major_minor(version)
  if key in MEASURED_CPU_CONV:
    setting = MEASURED_CPU_CONV[key]
    return CpuConvChoice(setting, CPU_CONV_SETTINGS[setting], True,
                         f'measured for jaxlib {key[0]}.{key[1]}')
  newest = max(MEASURED_CPU_CONV)
  if key is None or key < min(MEASURED_CPU_CONV):
    return CpuConvChoice(
        'jaxlib', None, False,
        f'jaxlib {version or "(not installed)"} is not supported: '
        'no flag set')
  setting = MEASURED_CPU_CONV[newest]
  flag = CPU_CONV_SETTINGS[setting]
  if flag is None or knows_flag(flag):
    return CpuConvChoice(
        setting, flag, False,
        f'jaxlib {version} was not measured: using the setting of jaxlib '
        f'{newest[0]}.{newest[1]}, whose flag it knows')
  return CpuConvChoice(
      'jaxlib', None, False,
      f'jaxlib {version} was not measured and does not know '
      f'{flag.split("=", 1)[0]}: its own kernels, no flag set')


def default_xla_flags(
    environ=None,
    version: str | None = None,
    knows_flag: Callable[[str], bool] = jaxlib_knows_flag) -> str | None:
  """Adds the convolution flag chosen for this jaxlib to `XLA_FLAGS`.

  Args:
    environ: the environment to edit (default `os.environ`).
    version: the jaxlib version (default: the installed one).
    knows_flag: the probe used for versions that were not measured.

  Returns:
    The flag added, or None when nothing was added (`CTX_JAX_XLA_DEFAULTS=0`,
    the user set the same XLA option, or the setting chosen needs no flag).
  """
  environ = os.environ if environ is None else environ
  version = jaxlib_version() if version is None else version
  _APPLIED.clear()
  if environ.get(_OPT_OUT, '1') == '0':
    _APPLIED.update(setting=None, flag=None,
                    reason=f'{_OPT_OUT}=0: no default XLA flags')
    return None
  choice = cpu_conv_choice(version, knows_flag)
  flags = environ.get('XLA_FLAGS', '')
  added = None
  reason = choice.reason
  if choice.flag is not None:
    if choice.flag.split('=', 1)[0] in flags:
      reason = f'{reason}; XLA_FLAGS already sets it (the user wins)'
    else:
      environ['XLA_FLAGS'] = f'{flags} {choice.flag}'.strip()
      added = choice.flag
  _APPLIED.update(setting=choice.setting, flag=added, reason=reason)
  message = 'XLA:CPU convolutions: %s (%s)'
  if choice.measured:
    _LOG.info(message, choice.setting, reason)
  else:
    _LOG.warning(message, choice.setting, reason)
  return added


def applied() -> dict[str, object]:
  """What the last `default_xla_flags` call decided: setting, flag, reason."""
  return dict(_APPLIED)


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
