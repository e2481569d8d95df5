"""ctx-eval's outputs: the console table, the JSON/CSV files, the chart.

Every file is written through a temporary name and a rename, so an
interrupted evaluation never leaves a half-written result.
"""

import csv
import io
from typing import Any

from etils import epath

from ctx_jax import paths
from ctx_jax.eval import references


def format_table(rows: dict[str, dict], first_column: str = "source",
                 average: bool = True,
                 reference: dict[str, float] | None = None) -> str:
  """A fixed-width table of per-row accuracy (or error), with an average.

  Args:
    rows: name -> {mean, ci95, num_episodes} (fractions) or {error}.
    first_column: header of the name column.
    average: add the mean over the rows that did not fail.
    reference: optional name -> published accuracy (%), shown as a column
      ("ref."); say which row and its source beside the table.

  Returns:
    The table as text.
  """
  ref_header = f" {'ref.':>7}" if reference else ""
  lines = [f"{first_column:<16} {'accuracy':>9} {'95% CI':>8} "
           f"{'episodes':>9}{ref_header}"]

  def ref(name):
    if not reference:
      return ""
    value = reference.get(name)
    return f" {value:>6.2f}%" if value is not None else f" {'-':>7}"

  for source, row in rows.items():
    if "error" in row:
      lines.append(f"{source:<16} FAILED: {row['error']}")
    else:
      lines.append(f"{source:<16} {100 * row['mean']:>8.2f}% "
                   f"{100 * row['ci95']:>7.2f}% {row['num_episodes']:>9d}"
                   f"{ref(source)}")
  good = {k: r for k, r in rows.items() if "error" not in r}
  if average and len(good) > 1:
    mean = sum(r["mean"] for r in good.values()) / len(good)
    paper = ""
    if reference and all(k in reference for k in good):
      paper_mean = sum(reference[k] for k in good) / len(good)
      paper = f" {'':>8} {'':>9} {paper_mean:>6.2f}%"
    lines.append(f"{'average':<16} {100 * mean:>8.2f}%{paper}")
  return "\n".join(lines)


def average_row(rows: dict[str, dict]) -> dict[str, Any] | None:
  """Mean accuracy over the domains that did not fail (None if none did)."""
  good = [r for r in rows.values() if "error" not in r]
  if not good:
    return None
  return {"mean": sum(r["mean"] for r in good) / len(good),
          "num_sources": len(good)}


def write_csv(path: epath.Path, rows: dict[str, dict],
              reference: dict[str, float] | None = None) -> None:
  """Per-domain rows (%), with the reference's accuracy when there is one."""
  lines = [["source", "accuracy_pct", "ci95_pct", "num_episodes",
            "reference_pct", "error"]]
  for source, row in rows.items():
    paper = (reference or {}).get(source, "")
    if "error" in row:
      lines.append([source, "", "", "", paper, row["error"]])
    else:
      lines.append([source, f"{100 * row['mean']:.4f}",
                    f"{100 * row['ci95']:.4f}", row["num_episodes"], paper,
                    ""])
  avg = average_row(rows)
  if avg and avg["num_sources"] > 1:
    lines.append(["average", f"{100 * avg['mean']:.4f}", "", "", "", ""])
  text = io.StringIO(newline="")
  csv.writer(text).writerows(lines)
  paths.write_atomic(path, text.getvalue())


def write_chart(path: epath.Path, rows: dict[str, dict], label: str,
                reference: references.Reference | None = None) -> None:
  """Bar chart: our accuracy (95% CI whiskers) next to the reference's."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  names = list(rows)
  x = np.arange(len(names))
  ours = [100 * rows[n]["mean"] if "error" not in rows[n] else 0.0
          for n in names]
  err = [100 * rows[n]["ci95"] if "error" not in rows[n] else 0.0
         for n in names]
  ref_acc = reference.accuracy if reference is not None else {}
  paper = [ref_acc.get(n, np.nan) for n in names]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
  width = 0.4
  ax.bar(x - width / 2, ours, width, yerr=err, capsize=3, label=label,
         color="tab:blue")
  if not all(np.isnan(paper)):
    ax.bar(x + width / 2, paper, width, label=reference.label,
           color="tab:gray")
  for i, n in enumerate(names):
    if "error" in rows[n]:
      ax.text(x[i] - width / 2, 1, "failed", rotation=90, ha="center",
              va="bottom", color="tab:red", fontsize=8)
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(loc="upper right", fontsize=8)
  ax.set_title("Meta-Dataset episodic accuracy (95% CI)")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  paths.write_atomic(path, png.getvalue())


def describe_reference(reference: references.Reference | None,
                       rows: dict[str, dict]) -> str:
  """One line under the table: which published row "ref." is, and whence."""
  if reference is None:
    return ("reference: none (no published row matches this config; "
            "--reference <name> picks one)")
  if not reference.available:
    return f"reference: {reference.label}: {reference.source}"
  if not any(s in reference.accuracy for s in rows):
    return (f"reference: {reference.label} has no number for these "
            "domains")
  return f"ref. = {reference.label}; source: {reference.source}"
