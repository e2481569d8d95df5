r"""ctx-train: trains a few-shot model (CTX or ProtoNet) from an experiment
config, validates it every `train.valid_every` steps, keeps the best model on
validation in <workdir>/best, exports the final one to <workdir>/export, and
writes <workdir>/results.json with the test accuracy of the best-validation
model (and the final model's beside it).

  ctx-train --config experiments/demo.py --workdir runs/demo_ctx \
      [--config.optimizer.learning_rate=1e-3 ...]

Every config field can be overridden with --config.<path>=<value>; the config
is locked, so a mistyped key is an error. Rerunning the same command resumes
from the last checkpoint in the work dir.

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
from meta_dataset_pipeline import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/<name>.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, "
                               "summaries and results are written.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the Python traceback of "
                             "an error.")
flags.mark_flags_as_required(["config", "workdir"])
PROG = "ctx-train"


def main(argv):
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log a lot at INFO; `--verbosity=0` brings it back.
    logging.set_verbosity(logging.WARNING)
  cli.guarded(PROG, _train, _VERBOSE.value)


def _train():
  # Bad config, data or work dir: one line, before JAX or TF start.
  from ctx_jax import config_checks  # pylint: disable=g-import-not-at-top
  config_checks.check_start_up(_CONFIG.value, _WORKDIR.value)
  distributed.maybe_initialize()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # tf.data runs on the host only; keep TF off the accelerators.
  tf.config.set_visible_devices([], "GPU")
  from ctx_jax.training import preemption  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import train  # pylint: disable=g-import-not-at-top
  logging.info("config:\n%s", _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)


def run():
  cli.quiet_tensorflow()
  app.run(main, flags_parser=cli.absl_flags_parser(
      PROG, __doc__, ["ctx_jax.main", "ctx_jax.distributed"]))


if __name__ == "__main__":
  run()
