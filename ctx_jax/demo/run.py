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
import statistics
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
  parser.add_argument("--seeds", default="0",
                      help="comma list of training seeds (config.seed): "
                      "each method is trained once per seed and the table "
                      "gives the mean and spread over seeds")
  args = parser.parse_args(argv)
  try:
    args.seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
  except ValueError:
    parser.error(f"--seeds: not a comma list of integers: {args.seeds!r}")
  if not args.seeds:
    parser.error("--seeds: empty list")
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


def demo_config(head: str, data_dir: pathlib.Path, steps, eval_episodes,
                seed: int = 0):
  from experiments import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config(f"head={head}")
  config.seed = seed
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


def run_name(head: str, seed: int) -> str:
  """Work dir of one training run: `ctx`, `ctx_seed1`, ..."""
  return head if seed == 0 else f"{head}_seed{seed}"


def seed_summary(results: list[dict]) -> dict[str, float]:
  """Mean, standard deviation (ddof=1; 0 for one run), min and max over the
  runs' test accuracies."""
  acc = [r["mean"] for r in results]
  return {"mean": statistics.mean(acc),
          "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
          "min": min(acc), "max": max(acc), "num_seeds": len(acc)}


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return cli.guarded("ctx-demo", lambda: _demo(args), args.verbose)


def _demo(args) -> int:
  """The demo proper; user errors end it through `cli.guarded`."""
  from ctx_jax import config_checks  # pylint: disable=g-import-not-at-top
  from ctx_jax.demo import dataset as demo_dataset  # pylint: disable=g-import-not-at-top

  # Start-up checks (and the data) before JAX and TF are imported; the work
  # dir is created only once they pass.
  config_checks.check_workdir(args.workdir)
  data_dir = pathlib.Path(args.data_dir)
  if not (data_dir / "dataset_spec.json").is_file():
    print(f"generating the demo dataset in {data_dir} ...", flush=True)
    demo_dataset.generate_dataset(str(data_dir), log=print)
  for head in ("ctx", "protonet"):
    if head in args.methods:
      config_checks.check_start_up(
          demo_config(head, data_dir, args.steps, args.eval_episodes),
          str(pathlib.Path(args.workdir) / run_name(head, args.seeds[0])))
  from ctx_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import episodic  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  from ctx_jax.eval import report as eval_report  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import train  # pylint: disable=g-import-not-at-top
  from ctx_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = workdir_lib.prepare_workdir(args.workdir)
  methods = args.methods
  rows, timings, selected, per_seed = {}, {}, {}, {}
  for head in ("ctx", "protonet"):
    if head not in methods:
      continue
    for seed in args.seeds:
      config = demo_config(head, data_dir, args.steps, args.eval_episodes,
                           seed)
      name = run_name(head, seed)
      run_dir = workdir / name
      results_file = run_dir / workdir_lib.RESULTS_FILE
      t0 = time.time()
      if results_file.is_file():
        results = json.loads(results_file.read_text())
        print(f"{name}: already trained, results from {results_file}")
      else:
        print(f"== training {head}, seed {seed}, in {run_dir}", flush=True)
        results = train.train_and_evaluate(config, str(run_dir))
      timings[name] = time.time() - t0
      # The best-validation model's figure (official model selection), and
      # the final model's beside it when it is another model.
      per_seed.setdefault(head, {})[seed] = results["test"][data_dir.name]
      selected[name] = results.get("selected", {}).get("step")
      if len(args.seeds) == 1:
        rows[head] = results["test"][data_dir.name]
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
    step = selected.get(run_name(head, args.seeds[0]))
    return names[head] + (f" (step {step})" if step is not None else "")

  over_seeds = {head: seed_summary(list(runs.values()))
                for head, runs in per_seed.items()}
  if len(args.seeds) > 1:
    print(f"test accuracy over {len(args.seeds)} training seeds "
          f"({', '.join(map(str, args.seeds))}); each run: the mean over "
          "the same test episodes")
    print(f"{'method':<16} {'mean':>8} {'std':>7} {'min':>8} {'max':>8}   "
          "per seed")
    for head, summary in over_seeds.items():
      runs = "  ".join(f"{100 * r['mean']:.2f}"
                       for r in per_seed[head].values())
      print(f"{names[head]:<16} {100 * summary['mean']:>7.2f}% "
            f"{100 * summary['std']:>6.2f} {100 * summary['min']:>7.2f}% "
            f"{100 * summary['max']:>7.2f}%   {runs}")
    for key in [k for k in rows if k == "pixels"]:
      print(f"{names[key]:<16} {100 * rows[key]['mean']:>7.2f}% "
            "(no training)")
  else:
    print(eval_report.format_table({label(k): v for k, v in rows.items()},
                                   first_column="method", average=False))
    print("CTX and ProtoNet rows: the best-validation checkpoint (its step "
          "in brackets), as the official protocol; 'final': the last "
          "step's model, when it differs.")
  test = {k: v for k, v in rows.items() if not k.endswith("_final")}
  for head, summary in over_seeds.items():
    test.setdefault(head, dict(summary, num_episodes=config.eval.num_episodes))
  (workdir / "demo_results.json").write_text(json.dumps(
      {"ways": ways, "shots": shots, "chance": 1 / ways,
       "seeds": args.seeds,
       "test": test,
       "test_per_seed": {h: {str(s): r for s, r in runs.items()}
                         for h, runs in per_seed.items()},
       "over_seeds": over_seeds,
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
