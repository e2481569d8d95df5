"""Runs file-system, tf.data, epath and orbax calls on `gs://`, for gcs tests.

Started by tests/gcs_emulator_test.py in a subprocess whose environment
points TF's GCS client at the emulator (tests/gcs_emulator.py):

    python -m tests.gcs_worker CHECKS BUCKET_URL RECORDS OUT

CHECKS names functions below, comma-separated: one process, one TF
start-up for all. Each works under BUCKET_URL/<its name> and may read the
local Meta-Dataset source folder RECORDS. The worker only reports what it
observed (OUT/result.json, arrays in .npz files; a check that raises reports
its traceback and the others still run); the test decides whether that is
right, comparing with local reads and with the emulator's own view of the
bucket.
"""

import json
import pathlib
import sys
import traceback

import numpy as np

CLASS_FILE = "0.tfrecords"  # Of the source in RECORDS.
# Small fixed episodes: the check is where bytes come from, not sampling.
EPISODE = {"num_ways": 5, "num_support": 2, "num_query": 2}
SEED = 5


def gfile(root, local, out):
  """tf.io.gfile on objects: write, (seek-)read, list, glob, rename, rmtree."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile_ = tf.io.gfile
  data = pathlib.Path(local, CLASS_FILE).read_bytes()
  path = f"{root}/dir/data.bin"
  gfile_.makedirs(f"{root}/dir")
  with gfile_.GFile(path, "wb") as f:
    f.write(data)
  with gfile_.GFile(f"{root}/dir/sub/note.txt", "w") as f:
    f.write("note")
  with gfile_.GFile(path, "rb") as f:
    whole = f.read()
    f.seek(1000)
    part = f.read(777)
  result = {
      "whole_equal": whole == data,
      "part_equal": part == data[1000:1777],
      "size": gfile_.stat(path).length,
      "exists": [gfile_.exists(p) for p in (
          path, f"{root}/dir", f"{root}/dir/missing.bin")],
      "isdir": [gfile_.isdir(p) for p in (f"{root}/dir", path)],
      "listdir": sorted(gfile_.listdir(f"{root}/dir")),
      "glob": sorted(gfile_.glob(f"{root}/dir/*.bin")),
  }
  gfile_.rename(path, f"{root}/dir/renamed.bin")
  with gfile_.GFile(f"{root}/dir/renamed.bin", "rb") as f:
    result["renamed_equal"] = f.read() == data
  result["old_exists_after_rename"] = gfile_.exists(path)
  gfile_.copy(f"{root}/dir/renamed.bin", f"{root}/keep/copy.bin")
  gfile_.rename(f"{root}/keep", f"{root}/kept")  # A folder, object by object.
  result["kept"] = gfile_.listdir(f"{root}/kept")
  gfile_.rmtree(f"{root}/dir")
  # A file, not the folder: TF keeps folder answers in its stat cache for
  # GCS_STAT_CACHE_MAX_AGE seconds (5 by default), as against real GCS.
  result["exists_after_rmtree"] = gfile_.exists(f"{root}/dir/sub/note.txt")
  return result


def tfrecords(root, local, out):
  """tf.data.TFRecordDataset over a class file copied to the bucket."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = f"{root}/{CLASS_FILE}"
  tf.io.gfile.copy(f"{local}/{CLASS_FILE}", path)
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  # The same file through a parallel, interleaved read, as pipelines do.
  interleaved = tf.data.Dataset.from_tensor_slices([path, path]).interleave(
      tf.data.TFRecordDataset, cycle_length=2,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  np.savez(f"{out}/records.npz", records=np.array(records, dtype=object),
           interleaved=np.array([r.numpy() for r in interleaved],
                                dtype=object))
  return {"num_records": len(records)}


def orbax(root, local, out):
  """An orbax CheckpointManager saving and restoring a pytree; etils epath."""
  del local
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from etils import epath
  # pylint: enable=g-import-not-at-top
  note = epath.Path(root) / "epath" / "note.txt"
  note.parent.mkdir(parents=True, exist_ok=True)
  note.write_text("written by epath")
  result = {"epath_text": note.read_text(),
            "epath_backend": type(note).__name__}

  def tree(step):
    return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * step,
            "b": {"c": jnp.full((4,), step, jnp.int32)}}

  options = ocp.CheckpointManagerOptions(max_to_keep=1)
  with ocp.CheckpointManager(f"{root}/ckpt", options=options) as mngr:
    for step in (1, 2):
      mngr.save(step, args=ocp.args.StandardSave(tree(step)))
    mngr.wait_until_finished()
  # A fresh manager sees only what is in the bucket.
  with ocp.CheckpointManager(f"{root}/ckpt", options=options) as mngr:
    result["steps"] = list(mngr.all_steps())
    restored = mngr.restore(mngr.latest_step(),
                            args=ocp.args.StandardRestore(tree(0)))
  np.savez(f"{out}/restored.npz", w=np.asarray(restored["w"]),
           c=np.asarray(restored["b"]["c"]))
  return result


def episodes(root, local, out):
  """Meta-Dataset episodes from a source the test copied to the bucket."""
  del local
  import meta_dataset_pipeline as mdp  # pylint: disable=g-import-not-at-top
  spec = mdp.load_dataset_spec(root)
  ds = mdp.make_one_source_episode_dataset(
      spec, "TEST", mdp.EpisodeDescriptionConfig(**EPISODE), image_size=28,
      seed=SEED)
  eps = list(ds.take(2).as_numpy_iterator())
  np.savez(f"{out}/episodes.npz", **{f"{i}.{k}": v for i, ep in
                                     enumerate(eps) for k, v in ep.items()})
  return {"num_episodes": len(eps)}


def train(root, local, out):
  """ctx-train's loop with records and work dir on the bucket, resumed, then
  the selected export loaded back and evaluated as ctx-eval does.

  The second run asks for one more step, so it must restore the bucket's
  checkpoint.
  """
  del local
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from ctx_jax import mesh as mesh_lib
  from ctx_jax.checkpoints import export
  from ctx_jax.eval import evaluate
  from ctx_jax.eval import resumable
  from ctx_jax.training import train as train_lib
  from experiments import demo
  from tests import fakes
  # pylint: enable=g-import-not-at-top
  data = fakes.make_tiny_demo(pathlib.Path(out, "train_data"))
  tf.io.gfile.makedirs(f"{root}/records/{data.name}")
  for f in sorted(data.iterdir()):
    tf.io.gfile.copy(str(f), f"{root}/records/{data.name}/{f.name}")
  steps = []
  for num_steps in (2, 3):
    config = demo.get_config("smoke")
    config.data.records_root = f"{root}/records"
    config.train.num_steps = num_steps
    config.train.valid_every = 2
    config.train.checkpoint_every = 1
    config.compilation_cache_dir = "none"
    steps.append(train_lib.train_and_evaluate(config, f"{root}/run")["step"])
  mesh = mesh_lib.make_mesh(1)
  model, _ = export.load_exported_model(f"{root}/run/best", mesh=mesh)
  summary = evaluate.evaluate_split(model, config, mesh, "TEST", data.name,
                                    3, seed=0)
  # What ctx-eval keys its saved episodes on: reads the export's files.
  key = resumable.model_key(f"{root}/run/best")
  return {"steps": steps, "best_arrays": len(jax_leaves(model)),
          "model_key_state": key["model_state"],
          "eval_episodes": summary.num_episodes,
          "eval_accuracy": summary.mean}


def jax_leaves(model):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(nnx.state(model))


def main(argv):
  checks, bucket_url, local, out = argv[1:]
  result = {}
  for check in checks.split(","):
    try:
      result[check] = globals()[check](f"{bucket_url}/{check}", local, out)
    except Exception:  # pylint: disable=broad-exception-caught
      result[check] = {"error": traceback.format_exc()}
  pathlib.Path(out, "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
