r"""`ctx-train`: trains (and then evaluates) a few-shot model from a config.

  ctx-train --config experiments/demo.py --workdir runs/demo_ctx \
      [--config.optimizer.learning_rate=1e-3 ...]

Multi-host runs add `--distributed` (or set CTX_JAX_DISTRIBUTED=1, as the
launchers in `launch/` do): `jax.distributed.initialize` then runs before any
device is touched, with cluster auto-detection (Cloud TPU, SLURM) or the
explicit `--coordinator_address/--num_processes/--process_id` (see
`ctx_jax/distributed.py`). A failure to initialise is an error, never a silent
fallback to a single process.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctx_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/<name>.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, "
                               "summaries and results are written.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors of the user's making: print the message, no traceback, exit 1.
USER_ERRORS = (FileNotFoundError, FileExistsError, PermissionError,
               ValueError, KeyError, FloatingPointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log a lot at INFO; `--verbosity=0` brings it back.
    logging.set_verbosity(logging.WARNING)
  distributed.maybe_initialize()
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # tf.data runs on the host only; keep TF off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  from ctx_jax.training import train  # pylint: disable=g-import-not-at-top
  logging.info("config:\n%s", _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    print(f"ctx-train: {e}", file=sys.stderr)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except USER_ERRORS as e:
    logging.exception("%s", type(e).__name__)
    print(f"ctx-train: error: {e}", file=sys.stderr)
    sys.exit(1)
  del jax


def run():
  app.run(main)


if __name__ == "__main__":
  run()
