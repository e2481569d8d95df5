"""Evaluation of a model (or a pixel baseline) on one source and split."""

from flax import nnx
import jax
import ml_collections

from ctx_jax.eval import baselines
from ctx_jax.eval import episodic
from ctx_jax.training import input_pipeline
from ctx_jax.training import mesh as mesh_lib
from ctx_jax.training import train_step as step_lib


def evaluate_split(model: nnx.Module | None,
                   config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, split: str, source: str,
                   num_episodes: int, seed: int
                   ) -> episodic.AccuracySummary:
  """Accuracy on `num_episodes` episodes of `split` of `source`.

  Args:
    model: a few-shot model, run in eval mode (EMA batch-norm statistics, as
      the official evaluation); None evaluates the raw-pixel 1-NN baseline on
      the same episodes instead.
    config: experiment config (data settings, episode config).
    mesh: device mesh; episodes are split over its devices.
    split: "TRAIN", "VALID" or "TEST".
    source: source name under `config.data.records_root`.
    num_episodes: how many episodes.
    seed: episode seed; the same seed gives the same episodes.

  Returns:
    The accuracy summary (mean and 95% CI).
  """
  stream = input_pipeline.episodes(
      config, split, [source], seed=seed, pad_multiple=mesh.size,
      process_index=jax.process_index(), process_count=jax.process_count())
  try:
    if model is None:
      return episodic.evaluate_episodes(baselines.pixel_nearest_neighbour,
                                        stream, num_episodes)
    num_ways = input_pipeline.max_ways(config, split)
    model.eval()
    try:
      with jax.set_mesh(mesh):
        return episodic.evaluate_episodes(
            lambda ep: step_lib.eval_step(model, ep, num_ways),
            (dev for dev, _ in mesh_lib.prefetch_to_mesh(
                stream, mesh, step_lib.MODEL_INPUT_KEYS)),
            num_episodes)
    finally:
      # Back to train mode: validation runs in the middle of training.
      model.train()
  finally:
    # Release the tf.data iterator now (TF 2.21 can hang at exit otherwise).
    stream.close()
