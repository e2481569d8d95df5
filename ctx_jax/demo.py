r"""`ctx-demo`: the whole demo on a CPU, end to end, in one command.

  ctx-demo --workdir runs/demo

1. generates the procedural glyph dataset (official Meta-Dataset record
   format) into `--data_dir` unless it is already there;
2. trains CTX (`experiments/demo.py`) and the ProtoNet baseline
   (`experiments/demo.py:head=protonet`, identical except for the head);
3. evaluates both, and a raw-pixel 1-NN baseline, on the same 5-way 5-shot
   episodes of the test classes, and prints the table (chance = 1/ways).

Each run resumes from its work dir, so an interrupted demo picks up where it
stopped. Runs already finished are not retrained.
"""

import json
import pathlib
import sys
import time

from meta_dataset_pipeline import cli

METHODS = ("ctx", "protonet", "pixels")


def parse_args(argv):
  parser = cli.ArgumentParser(prog="ctx-demo", description=__doc__.strip())
  parser.add_argument("--workdir", default="runs/demo",
                      help="where the runs, their results and "
                      "demo_results.json go")
  parser.add_argument("--data_dir", default="demo_data/glyphs",
                      help="demo records (generated here if absent)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per model (default: config)")
  parser.add_argument("--eval_episodes", type=int, default=None,
                      help="test episodes per method (default: config)")
  parser.add_argument("--methods", default="ctx,protonet,pixels",
                      help="comma list of ctx, protonet, pixels")
  args = parser.parse_args(argv)
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown or not args.methods:
    parser.error(f"--methods: unknown {unknown or 'empty list'}; known: "
                 f"{', '.join(METHODS)}")
  for name in ("steps", "eval_episodes"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name} must be at least 1, got {value}")
  return args


def demo_config(head: str, data_dir: pathlib.Path, steps, eval_episodes):
  from experiments import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config(f"head={head}")
  config.data.records_root = str(data_dir.parent)
  source = (data_dir.name,)
  config.data.train_sources = config.data.valid_sources = source
  config.data.test_sources = source
  if steps is not None:
    config.train.num_steps = steps
    config.train.valid_every = min(config.train.valid_every, max(1, steps))
    config.train.checkpoint_every = max(1, steps)
  if eval_episodes is not None:
    config.eval.num_episodes = eval_episodes
  config.lock()
  return config


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return cli.guarded("ctx-demo", lambda: _demo(args), args.verbose)


def _demo(args) -> int:
  """The demo proper; user errors end it through `cli.guarded`."""
  from ctx_jax import config_checks  # pylint: disable=g-import-not-at-top
  from meta_dataset_pipeline import demo_data  # pylint: disable=g-import-not-at-top

  # Start-up checks (and the data) before JAX and TF are imported; the work
  # dir is created only once they pass.
  config_checks.check_workdir(args.workdir)
  data_dir = pathlib.Path(args.data_dir)
  if not (data_dir / "dataset_spec.json").is_file():
    print(f"generating the demo dataset in {data_dir} ...", flush=True)
    demo_data.generate_dataset(str(data_dir), log=print)
  for head in ("ctx", "protonet"):
    if head in args.methods:
      config_checks.check_start_up(
          demo_config(head, data_dir, args.steps, args.eval_episodes),
          str(pathlib.Path(args.workdir) / head))
  from ctx_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import episodic  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import report as eval_report  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import train  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = workdir_lib.prepare_workdir(args.workdir)
  methods = args.methods
  rows, timings, selected = {}, {}, {}
  for head in ("ctx", "protonet"):
    if head not in methods:
      continue
    config = demo_config(head, data_dir, args.steps, args.eval_episodes)
    run_dir = workdir / head
    results_file = run_dir / workdir_lib.RESULTS_FILE
    t0 = time.time()
    if results_file.is_file():
      results = json.loads(results_file.read_text())
      print(f"{head}: already trained, results from {results_file}")
    else:
      print(f"== training {head} in {run_dir}", flush=True)
      results = train.train_and_evaluate(config, str(run_dir))
    timings[head] = time.time() - t0
    # The best-validation model's figure (official model selection), and
    # the final model's beside it when it is another model.
    rows[head] = results["test"][data_dir.name]
    selected[head] = results.get("selected", {}).get("step")
    final = results.get("final_test", {}).get(data_dir.name)
    if final is not None and final != rows[head]:
      rows[f"{head}_final"] = final
  if "pixels" in methods:
    config = demo_config("ctx", data_dir, args.steps, args.eval_episodes)
    mesh = mesh_lib.make_mesh(1)
    num = config.eval.num_episodes
    print(f"== pixel 1-NN baseline on {num} test episodes", flush=True)
    progress = episodic.RateLogger("pixel 1-NN", num,
                                   log=lambda s: print(s, flush=True))
    done = []

    def on_chunk(values):
      done.extend(values)
      progress(len(done))

    accuracies = evaluate.source_accuracies(
        None, config, mesh, "TEST", data_dir.name, num, config.eval.seed,
        chunk_size=max(1, num // 10), on_chunk=on_chunk)
    rows["pixels"] = episodic.summarize(accuracies).as_dict()
  ways = config.data.eval_episode.num_ways
  shots = config.data.eval_episode.num_support
  print(f"\nDemo: {ways}-way {shots}-shot test episodes of {data_dir} "
        f"(chance {100 / ways:.1f}%)")
  names = {"ctx": "CTX", "protonet": "ProtoNet", "pixels": "pixel 1-NN"}

  def label(key):
    head, _, final = key.partition("_")
    if final:
      return f"{names[head]} final"
    return names[head] + (f" (step {selected[head]})"
                          if selected.get(head) is not None else "")

  print(eval_report.format_table({label(k): v for k, v in rows.items()},
                               first_column="method", average=False))
  print("CTX and ProtoNet rows: the best-validation checkpoint (its step in "
        "brackets), as the official protocol; 'final': the last step's "
        "model, when it differs.")
  (workdir / "demo_results.json").write_text(json.dumps(
      {"ways": ways, "shots": shots, "chance": 1 / ways,
       "test": {k: v for k, v in rows.items() if not k.endswith("_final")},
       "selected_step": selected,
       "final_test": {k[:-len("_final")]: v for k, v in rows.items()
                      if k.endswith("_final")},
       "seconds": timings}, indent=2) + "\n")
  return 0


def run():
  cli.quiet_tensorflow()
  sys.exit(main())


if __name__ == "__main__":
  run()
