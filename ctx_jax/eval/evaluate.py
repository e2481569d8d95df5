"""Evaluation of a model (or a pixel baseline) on one source and split."""

from typing import Callable, Mapping, Sequence

from flax import nnx
import jax
import ml_collections

from ctx_jax import distributed
from ctx_jax import mesh as mesh_lib
from ctx_jax.data import input_pipeline
from ctx_jax.eval import baselines
from ctx_jax.eval import episodic
from ctx_jax.eval import step as eval_step_lib
from ctx_jax.models import episode as episode_lib


def source_accuracies(model: nnx.Module | None,
                      config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh, split: str, source: str,
                      num_episodes: int, seed: int, start: int = 0,
                      chunk_size: int = 0,
                      on_chunk: Callable[[Sequence[float]], None]
                      | None = None,
                      baseline: Callable[[Mapping], Mapping] | None = None
                      ) -> list[float]:
  """Per-episode accuracies on episodes `start..num_episodes-1` of a source.

  The episode stream is always the one of `seed`, from its first episode: the
  first `start` episodes are drawn (on the host) but not run through the
  model, so a resumed evaluation sees exactly the episodes an uninterrupted
  one would.

  Args:
    model: a few-shot model, run in eval mode (EMA batch-norm statistics, as
      the official evaluation); None evaluates the raw-pixel 1-NN baseline on
      the same episodes instead (or `baseline`).
    config: experiment config (data settings, episode config).
    mesh: device mesh; each episode's images are split over its devices.
    split: "TRAIN", "VALID" or "TEST".
    source: source name under `config.data.records_root`.
    num_episodes: total episodes of the evaluation.
    seed: episode seed; the same seed gives the same episodes.
    start: episodes already done (skipped here).
    chunk_size: see `episodic.episode_accuracies`.
    on_chunk: see `episodic.episode_accuracies`.
    baseline: with `model` None, the non-learned classifier to run on the
      host-side episodes (`baselines.py`); default raw-pixel 1-NN.

  Returns:
    The accuracies of episodes `start` to `num_episodes - 1`.
  """
  # Every source and split shares the run's evaluation shapes: a bounded
  # number of compiled eval steps (ctx_jax/data/compile_plan.py).
  buckets = input_pipeline.eval_buckets(config, split, source, mesh.size)
  stream = input_pipeline.episodes(
      config, split, [source], seed=seed, pad_multiple=mesh.size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      start_episode=start,  # Skipped episodes are sampled, not read.
      buckets=buckets)
  remaining = num_episodes - start
  try:
    # Multi-process: every process checks the others feed the same episode.
    episodes = distributed.check_agreement(
        stream, f"{split}/{source}", seed, start=start)
    if model is None:
      return episodic.episode_accuracies(
          baseline or baselines.pixel_nearest_neighbour, episodes, remaining,
          chunk_size, on_chunk)
    num_ways = input_pipeline.max_ways(config, split)
    eval_fn = eval_step_lib.select_eval_step(config.train.parallelism, mesh)
    model.eval()
    try:
      with jax.set_mesh(mesh):
        return episodic.episode_accuracies(
            lambda ep: eval_fn(model, ep, num_ways),
            (dev for dev, _ in mesh_lib.prefetch_to_mesh(
                episodes, mesh, episode_lib.MODEL_INPUT_KEYS)),
            remaining, chunk_size, on_chunk)
    finally:
      # Back to train mode: validation runs in the middle of training.
      model.train()
  finally:
    # Release the tf.data iterator now (TF 2.21 can hang at exit otherwise).
    stream.close()


def evaluate_split(model: nnx.Module | None,
                   config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, split: str, source: str,
                   num_episodes: int, seed: int
                   ) -> episodic.AccuracySummary:
  """Accuracy on `num_episodes` episodes of `split` of `source`.

  Args:
    model: see `source_accuracies` (None: raw-pixel 1-NN baseline).
    config: experiment config (data settings, episode config).
    mesh: device mesh; episodes are split over its devices.
    split: "TRAIN", "VALID" or "TEST".
    source: source name under `config.data.records_root`.
    num_episodes: how many episodes.
    seed: episode seed; the same seed gives the same episodes.

  Returns:
    The accuracy summary (mean and 95% CI).
  """
  return episodic.summarize(source_accuracies(
      model, config, mesh, split, source, num_episodes, seed))
