"""Multi-process start-up shared by `ctx-train` and `ctx-eval`.

`--distributed` (or env CTX_JAX_DISTRIBUTED=1, as the launchers in `launch/`
set it) makes the program call `jax.distributed.initialize` before any device
is touched, with cluster auto-detection (Cloud TPU, SLURM, ...) or the
explicit `--coordinator_address/--num_processes/--process_id`. A failure to
initialise is an error, never a silent fallback to a single process.
"""

import os

from absl import flags

DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("CTX_JAX_DISTRIBUTED") == "1",
    "Call jax.distributed.initialize() first (multi-process runs; default: "
    "env CTX_JAX_DISTRIBUTED=1).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("CTX_JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 (optional; default: env "
    "CTX_JAX_COORDINATOR_ADDRESS, else auto-detected).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "Number of processes (optional; default: env CTX_JAX_NUM_PROCESSES, "
    "else auto-detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (optional; default: env "
    "CTX_JAX_PROCESS_ID, else auto-detected).")
LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Local accelerator ids this process uses "
    "(optional; default: env CTX_JAX_LOCAL_DEVICE_IDS). Under SLURM, JAX "
    "otherwise gives each task only GPU $SLURM_LOCALID, which is right for "
    "one task per GPU; one task per node must list all its GPUs.")


def _from_env(value, name):
  if value is not None:
    return value
  text = os.environ.get(name)
  return int(text) if text else None


def initialize_kwargs() -> dict[str, object]:
  """The explicit `jax.distributed.initialize` arguments (flags, then env)."""
  values = (("coordinator_address", COORDINATOR.value),
            ("num_processes", _from_env(NUM_PROCESSES.value,
                                        "CTX_JAX_NUM_PROCESSES")),
            ("process_id", _from_env(PROCESS_ID.value, "CTX_JAX_PROCESS_ID")))
  ids = LOCAL_DEVICE_IDS.value
  if ids is None and os.environ.get("CTX_JAX_LOCAL_DEVICE_IDS"):
    ids = os.environ["CTX_JAX_LOCAL_DEVICE_IDS"].split(",")
  if ids:
    values += (("local_device_ids", [int(i) for i in ids]),)
  return {k: v for k, v in values if v is not None}


def maybe_initialize() -> bool:
  """Initialises multi-process JAX if `--distributed`; returns whether."""
  if not DISTRIBUTED.value:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on the CPU backend need an implementation
  # (gloo ships with jaxlib). It is JAX 0.10's default; set it explicitly so a
  # CPU-only multi-process run never depends on that default. It does not
  # affect GPU or TPU backends.
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**initialize_kwargs())
  return True
