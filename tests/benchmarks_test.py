"""The train-step benchmark runs without TensorFlow (accelerator hosts)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Blocks `import tensorflow` (ImportError), then runs the script as __main__.
RUN_WITHOUT_TF = """
import runpy, sys
sys.modules['tensorflow'] = None
sys.path.insert(0, 'benchmarks')
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_train_step_bench_runs_without_tensorflow(tmp_path):
  output = tmp_path / "bench.json"
  cmd = [sys.executable, "-c", RUN_WITHOUT_TF,
         "benchmarks/train_step_bench.py", "--backbone", "resnet_tiny",
         "--sizes", "32", "--support", "5", "--query", "3", "--ways", "2",
         "--device_counts", "1,2", "--parallelism", "shard_map",
         "--dtypes", "float32", "--steps", "1", "--output", str(output)]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
  report = json.loads(output.read_text())
  rows = report["rows"]
  assert [r["devices"] for r in rows] == [1, 2]
  for row in rows:
    assert row["step_s"] > 0 and row["images_per_s"] > 0
    assert row["memory_bytes"] > 0 and row["flops_per_device"] > 0
  # The same episode (padding rows aside) on 1 and 2 devices: same loss,
  # about half the FLOPs per device (the update is replicated).
  assert abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 1e-3
  assert 0.4 < rows[1]["flops_per_device"] / rows[0]["flops_per_device"] < 0.8


def test_train_step_bench_rejects_unknown_episode(tmp_path):
  cmd = [sys.executable, "-c", RUN_WITHOUT_TF,
         "benchmarks/train_step_bench.py", "--episodes", "a,zz",
         "--output", str(tmp_path / "x.json")]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 1
  assert "unknown episodes ['zz']" in out.stderr
