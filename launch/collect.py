r"""Gathers the results of a sweep's runs into one table.

  python -m launch.collect --root runs/sweep [--output runs/sweep/collected]

Runs are the entries of `<root>/sweep.json` (written by `launch.sweep
--run`), else every folder under `<root>` holding a `results.json`. From each
run it reads `results.json` (written by `ctx-train`: the final step, `test`
accuracies per source of the best-validation model and the step it came
from, `selected_step`, and, when present, `valid` ones) and any `ctx-eval`
output `eval_*.json` in the run folder. Prints a table (one row per run,
mean accuracy in % per source and their average per kind) and writes
`<output>.csv` and `<output>.json` (default `<root>/collected`). A run without
results is listed as missing, not dropped.
"""

import argparse
import csv
import io
import json
import sys

from etils import epath

from launch import sweep as sweep_lib


def find_runs(root: epath.Path) -> list[dict]:
  """`[{"name", "workdir", "overrides"}]` from sweep.json or the folders."""
  listing = root / sweep_lib.SWEEP_FILE
  if listing.is_file():
    return [{"name": r["name"], "workdir": r["workdir"],
             "overrides": r.get("overrides", {})}
            for r in json.loads(listing.read_text())["runs"]]
  return [{"name": p.parent.name, "workdir": str(p.parent), "overrides": {}}
          for p in sorted(root.glob(f"*/{sweep_lib.RESULTS_FILE}"))]


def _means(section: dict) -> dict[str, float]:
  return {s: 100 * r["mean"] for s, r in section.items()
          if isinstance(r, dict) and "mean" in r}


def run_row(run: dict) -> dict:
  """One table row: overrides, step, `<kind>/<source>` accuracies (%)."""
  row = {"run": run["name"], **{k.removeprefix("config."): v
                                for k, v in run["overrides"].items()}}
  workdir = epath.Path(run["workdir"])
  results = workdir / sweep_lib.RESULTS_FILE
  if not results.is_file():
    row["status"] = f"missing {results}"
    return row
  data = json.loads(results.read_text())
  row["status"] = "done"
  row["step"] = data.get("step")
  # The reported test figures are the best-validation model's.
  row["selected_step"] = (data.get("selected") or {}).get("step")
  for kind in ("valid", "test"):
    means = _means(data.get(kind) or {})
    row.update({f"{kind}/{s}": v for s, v in means.items()})
    if len(means) > 1:
      row[f"{kind}/average"] = sum(means.values()) / len(means)
  for path in sorted(workdir.glob("eval_*.json")):
    means = _means(json.loads(path.read_text()).get("results", {}))
    kind = path.stem  # eval_test, eval_valid, ...
    row.update({f"{kind}/{s}": v for s, v in means.items()})
    if len(means) > 1:
      row[f"{kind}/average"] = sum(means.values()) / len(means)
  return row


def format_rows(rows: list[dict], columns: list[str]) -> str:
  def cell(v):
    return f"{v:.2f}" if isinstance(v, float) else ("" if v is None
                                                    else str(v))
  table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
  return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths))
                   for line in table)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m launch.collect", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True)
  parser.add_argument("--output", default=None,
                      help="path without extension (default: "
                      "<root>/collected)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  root = epath.Path(args.root)
  if not root.is_dir():
    print(f"launch.collect: error: {root} is not a directory",
          file=sys.stderr)
    return 2
  runs = find_runs(root)
  if not runs:
    print(f"launch.collect: error: no runs under {root} (no "
          f"{sweep_lib.SWEEP_FILE} and no */{sweep_lib.RESULTS_FILE})",
          file=sys.stderr)
    return 2
  rows = [run_row(r) for r in runs]
  columns = []
  for r in rows:
    columns += [c for c in r if c not in columns]
  print(format_rows(rows, columns))
  output = epath.Path(args.output or root / "collected")
  csv_path = epath.Path(f"{output}.csv")
  json_path = epath.Path(f"{output}.json")
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  csv_path.write_text(text.getvalue())
  json_path.write_text(json.dumps(rows, indent=2) + "\n")
  print(f"wrote {csv_path}, {json_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
