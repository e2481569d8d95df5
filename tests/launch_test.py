"""Launchers (dry runs, local multi-process runs) and sweeps."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import collect
from launch import local
from launch import slurm
from launch import sweep
from launch import tpu
from tests import fakes
from tests.eval_cli_test import tiny  # pylint: disable=unused-import (fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_SMOKE = str(REPO / "experiments" / "demo.py") + ":smoke"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
ENV.pop("XLA_FLAGS", None)


def _launch(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args],
                        env=ENV, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_local_dry_run_prints_every_process(capsys):
  assert local.main(["--num_processes", "2", "--platform", "cpu",
                     "--cpu_devices", "3", "--port", "4321", "--dry_run",
                     "--", "ctx-train", "--config", "c.py", "--workdir",
                     "w x"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert line.startswith(f"[p{i}] ")
    assert "CTX_JAX_DISTRIBUTED=1" in line
    assert "CTX_JAX_COORDINATOR_ADDRESS=127.0.0.1:4321" in line
    assert "CTX_JAX_NUM_PROCESSES=2" in line
    assert f"CTX_JAX_PROCESS_ID={i}" in line
    assert "--xla_force_host_platform_device_count=3" in line
    assert line.endswith("ctx-train --config c.py --workdir 'w x'")


def test_local_single_process_and_gpu_split(capsys):
  local.main(["--num_gpus", "0", "--dry_run", "--", "ctx-train"])
  line = capsys.readouterr().out.strip()
  assert "CTX_JAX_DISTRIBUTED" not in line and line.endswith("ctx-train")
  local.main(["--num_processes", "2", "--gpus_per_process", "4",
              "--num_gpus", "8", "--dry_run", "--", "ctx-train"])
  lines = capsys.readouterr().out.splitlines()
  assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in lines[0]
  assert "CUDA_VISIBLE_DEVICES=4,5,6,7" in lines[1]


def test_local_without_program_is_an_error():
  proc = _launch("local", "--num_processes", "2")
  assert proc.returncode == 2 and "missing program" in proc.stderr


def test_local_failure_stops_the_other_processes(tmp_path):
  marker = tmp_path / "survived"
  script = ("import os, sys, time\n"
            "if os.environ['CTX_JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
            f"time.sleep(60); open({str(marker)!r}, 'w').close()\n")
  t0 = time.time()
  proc = _launch("local", "--num_processes", "2", "--", sys.executable,
                 "-c", script, timeout=120)
  assert proc.returncode == 3
  assert "process 1 exited with status 3" in proc.stdout
  assert time.time() - t0 < 50
  assert not marker.exists()


def test_tpu_dry_run_starts_the_program_on_every_worker(capsys):
  assert tpu.main(["--tpu", "pod", "--zone", "us-central2-b", "--project",
                   "p", "--setup", "git pull", "--env", "A=1", "--dry_run",
                   "--", "ctx-train", "--config", "experiments/ctx_ilsvrc.py",
                   "--workdir", "gs://b/runs/ctx"]) == 0
  cmd = shlex.split(capsys.readouterr().out)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--zone=us-central2-b" in cmd and "--project=p" in cmd
  assert "--worker=all" in cmd
  remote = [c for c in cmd if c.startswith("--command=")][0]
  assert remote == (
      "--command=cd ~/ctx-jax && git pull && "
      'GCS_READ_CACHE_BLOCK_SIZE_MB="${GCS_READ_CACHE_BLOCK_SIZE_MB:-1}" '
      "A=1 CTX_JAX_DISTRIBUTED=1 "
      "TF_CPP_MIN_LOG_LEVEL=2 ctx-train --config experiments/ctx_ilsvrc.py "
      "--workdir gs://b/runs/ctx")


def test_local_starts_one_process_per_gpu_by_default(capsys, monkeypatch):
  """Issue 22: a multi-GPU host gets one process per GPU, each with its GPU,
  its memory fraction and tf.data's threads capped; the user's env wins."""
  monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
  monkeypatch.setattr(local.os, "cpu_count", lambda: 96)
  assert local.main(["--num_gpus", "8", "--dry_run", "--", "ctx-train"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 8
  for i, line in enumerate(lines):
    assert "CTX_JAX_NUM_PROCESSES=8" in line
    assert f"CTX_JAX_PROCESS_ID={i} CUDA_VISIBLE_DEVICES={i} " in line
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 " in line
    assert "TF_NUM_INTEROP_THREADS=12 " in line
    assert "TF_NUM_INTRAOP_THREADS" not in line  # The user's 3 stays.
  # The visible GPUs are the ones split; one process on request.
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
  local.main(["--dry_run", "--", "ctx-train"])
  lines = capsys.readouterr().out.splitlines()
  assert ["CUDA_VISIBLE_DEVICES=2 " in lines[0],
          "CUDA_VISIBLE_DEVICES=5 " in lines[1]] == [True, True]
  local.main(["--num_processes", "1", "--dry_run", "--", "ctx-train"])
  line = capsys.readouterr().out.strip()
  assert "CTX_JAX_DISTRIBUTED" not in line
  assert "CUDA_VISIBLE_DEVICES" not in line
  # Processes sharing GPUs share the memory fraction.
  local.main(["--num_processes", "3", "--dry_run", "--", "ctx-train"])
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 " in capsys.readouterr().out
  proc = _launch("local", "--num_processes", "2", "--gpus_per_process", "2",
                 "--num_gpus", "3", "--dry_run", "--", "ctx-train")
  assert proc.returncode == 2 and "need 4 GPUs" in proc.stderr


def test_tpu_dry_run_sets_gcs_and_cache_settings(capsys):
  tpu.main(["--tpu", "pod", "--zone", "z", "--cache_dir", "gs://b/cache",
            "--env", "GCS_READ_CACHE_BLOCK_SIZE_MB=4", "--dry_run", "--",
            "ctx-train", "--workdir", "gs://b/runs/ctx"])
  remote = [c for c in shlex.split(capsys.readouterr().out)
            if c.startswith("--command=")][0]
  assert "GCS_READ_CACHE_BLOCK_SIZE_MB=4 " in remote  # --env wins.
  assert "${GCS_READ_CACHE_BLOCK_SIZE_MB" not in remote
  assert remote.endswith(
      "ctx-train --workdir gs://b/runs/ctx "
      "--config.compilation_cache_dir=gs://b/cache")
  # The default, unless the worker's own environment sets it.
  tpu.main(["--tpu", "pod", "--zone", "z", "--dry_run", "--", "sh", "-c",
            'echo "$GCS_READ_CACHE_BLOCK_SIZE_MB"'])
  remote = [c for c in shlex.split(capsys.readouterr().out)
            if c.startswith("--command=")][0]
  command = remote.removeprefix("--command=cd ~/ctx-jax && ")
  for preset, expected in ((None, "1"), ("8", "8")):
    env = {k: v for k, v in os.environ.items()
           if k != "GCS_READ_CACHE_BLOCK_SIZE_MB"}
    if preset:
      env["GCS_READ_CACHE_BLOCK_SIZE_MB"] = preset
    out = subprocess.run(["bash", "-c", command], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == expected


@pytest.mark.parametrize("tasks", ["per_gpu", "per_node"])
def test_slurm_dry_run_prints_the_script(tasks, capsys, tmp_path):
  script = tmp_path / "job.sbatch"
  assert slurm.main(["--nodes", "3", "--gpus_per_node", "4", "--tasks",
                     tasks, "--partition", "gpu", "--script", str(script),
                     "--dry_run", "--", "ctx-train", "--config", "c.py",
                     "--workdir", "runs/x"]) == 0
  out = capsys.readouterr().out
  assert not script.exists()  # a dry run writes nothing
  assert "#SBATCH --nodes=3" in out and "#SBATCH --gpus-per-node=4" in out
  assert "#SBATCH --partition=gpu" in out
  assert "export CTX_JAX_DISTRIBUTED=1" in out
  assert ("srun --kill-on-bad-exit=1 ctx-train --config c.py --workdir "
          "runs/x") in out
  assert f"sbatch {script}" in out
  # tf.data's thread pools sized to the task's cores (the user's env wins).
  cpus = 8 if tasks == "per_gpu" else 32
  assert (f'export TF_NUM_INTEROP_THREADS="${{TF_NUM_INTEROP_THREADS:-{cpus}}}"'
          in out)
  if tasks == "per_gpu":
    assert "#SBATCH --ntasks-per-node=4" in out
    assert "CTX_JAX_LOCAL_DEVICE_IDS" not in out
  else:
    assert "#SBATCH --ntasks-per-node=1" in out
    assert "export CTX_JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out


def test_sweep_grid_and_list_expansion():
  runs = sweep.expand(["config.optimizer.learning_rate=1e-4,3e-4",
                       "data.train_sources=(a,b),(c,)"],
                      ["config.seed=1;config.seed=2,config.train.num_steps=5"])
  assert len(runs) == 6
  assert runs[0] == [("config.optimizer.learning_rate", "1e-4"),
                     ("config.data.train_sources", "(a,b)")]
  assert runs[3] == [("config.optimizer.learning_rate", "3e-4"),
                     ("config.data.train_sources", "(c,)")]
  assert runs[5] == [("config.seed", "2"), ("config.train.num_steps", "5")]
  names = [sweep.run_name(r, {"config.optimizer.learning_rate": "lr"})
           for r in runs]
  assert names[0] == "lr=1e-4,train_sources=(a,b)"
  assert names[5] == "seed=2,num_steps=5"
  assert len(set(names)) == 6
  with pytest.raises(ValueError, match="nothing to sweep"):
    sweep.expand([], [])
  with pytest.raises(ValueError, match="not KEY=VALUE"):
    sweep.expand(["config.seed"], [])


def test_sweep_prints_validated_commands(capsys, tmp_path):
  assert sweep.main(["--config", DEMO_SMOKE, "--root", str(tmp_path / "s"),
                     "--grid", "config.optimizer.learning_rate=1e-4,3e-4",
                     "--grid", "config.seed=0,1",
                     "--name", "config.optimizer.learning_rate=lr",
                     "--launcher", "local", "--launcher_args",
                     "--num_processes 2", "--", "--config.train.num_steps=2"]
                    ) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4
  cmd = shlex.split(lines[3])
  assert cmd[1:6] == ["-m", "launch.local", "--num_processes", "2", "--"]
  assert cmd[6:] == ["ctx-train", "--config", DEMO_SMOKE, "--workdir",
                     str(tmp_path / "s" / "lr=3e-4,seed=1"),
                     "--config.optimizer.learning_rate=3e-4",
                     "--config.seed=1", "--config.train.num_steps=2"]
  assert not (tmp_path / "s").exists()  # printing starts nothing


@pytest.mark.parametrize("override,message", [
    ("config.optimizer.learning_rat=1e-4", "learning_rat"),
    ("config.seed=abc", "config.seed=abc"),
])
def test_sweep_bad_override_fails_before_anything_runs(override, message,
                                                      tmp_path, capsys):
  marker = tmp_path / "ran"
  code = sweep.main(["--config", DEMO_SMOKE, "--root", str(tmp_path / "s"),
                     "--list", f"config.seed=1;{override}", "--run",
                     "--program", f"touch {marker}"])
  assert code == 2
  assert message in capsys.readouterr().err
  assert not marker.exists() and not (tmp_path / "s").exists()


def test_sweep_runs_in_sequence_and_collect_gathers(tmp_path, capsys):
  # A stand-in program writing what ctx-train writes: results.json.
  fake = tmp_path / "fake_train.py"
  fake.write_text(
      "import json, pathlib, sys\n"
      "args = sys.argv[1:]\n"
      "workdir = pathlib.Path(args[args.index('--workdir') + 1])\n"
      "lr = float([a for a in args if 'learning_rate' in a][0].split('=')[1])\n"
      "if lr > 1: sys.exit(4)\n"
      "workdir.mkdir(parents=True)\n"
      "res = {'step': 3, 'valid': {'glyphs': {'mean': lr * 1000}},\n"
      "       'test': {'a': {'mean': lr * 1000, 'ci95': 0.01},\n"
      "                'b': {'mean': 0.5, 'ci95': 0.01}},\n"
      "       'selected': {'model': 'best', 'step': 2}}\n"
      "(workdir / 'results.json').write_text(json.dumps(res))\n")
  root = tmp_path / "s"
  args = ["--config", DEMO_SMOKE, "--root", str(root), "--grid",
          "config.optimizer.learning_rate=1e-4,3e-4,5", "--program",
          f"{sys.executable} {fake}", "--run"]
  assert sweep.main(args) == 1  # the lr=5 run fails, the others finish
  out = capsys.readouterr()
  assert "learning_rate=5: FAILED (status 4)" in out.out
  assert (root / "learning_rate=3e-4" / "results.json").is_file()
  assert sweep.main(args) == 1
  assert "learning_rate=1e-4: done already, skipped" in capsys.readouterr().out

  assert collect.main(["--root", str(root)]) == 0
  table = capsys.readouterr().out
  assert "test/average" in table and "missing" in table
  rows = json.loads((root / "collected.json").read_text())
  assert [r["run"] for r in rows] == ["learning_rate=1e-4",
                                      "learning_rate=3e-4", "learning_rate=5"]
  assert rows[1]["optimizer.learning_rate"] == "3e-4"
  assert rows[1]["test/a"] == pytest.approx(30.0)
  assert rows[1]["valid/glyphs"] == pytest.approx(30.0)
  assert rows[1]["test/average"] == pytest.approx(40.0)
  assert rows[1]["selected_step"] == 2
  assert rows[2]["status"].startswith("missing")
  assert (root / "collected.csv").read_text().startswith("run,")


def test_two_process_eval_matches_one_process(tiny, tmp_path):
  """2 CPU processes x 2 devices == 1 process x 4 devices, episode by episode.

  The episode is split over the 4 devices of both processes; the model's
  batch norm and attention reduce across processes (gloo collectives).
  """
  records_root, export = tiny
  outputs = {}
  for processes, devices in ((2, 2), (1, 4)):
    out = tmp_path / f"p{processes}" / "eval.json"
    proc = _launch(
        "local", "--num_processes", str(processes), "--platform", "cpu",
        "--cpu_devices", str(devices), "--", sys.executable, "-m",
        "ctx_jax.eval.main", "--config", DEMO_SMOKE,
        f"--config.data.records_root={records_root}", "--model_dir",
        str(export), "--sources", "glyphs", "--num_episodes", "3",
        "--nochart", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "4 device(s) over " f"{processes} process(es)" in proc.stdout
    if processes == 2:
      assert "[p0] " in proc.stdout
    outputs[processes] = json.loads(
        out.with_suffix(".episodes.json").read_text())["sources"]["glyphs"]
  np.testing.assert_allclose(outputs[2]["accuracies"],
                             outputs[1]["accuracies"], atol=1e-6)


def test_two_process_training_matches_one_process(tmp_path):
  """ctx-train through launch.local: 2 processes x 2 CPU devices train,
  checkpoint, export and evaluate exactly as 1 process x 4 devices."""
  data = fakes.make_tiny_demo(tmp_path / "data")
  results, logs = {}, {}
  for processes, devices in ((2, 2), (1, 4)):
    workdir = tmp_path / f"w{processes}"
    proc = _launch(
        "local", "--num_processes", str(processes), "--platform", "cpu",
        "--cpu_devices", str(devices), "--", sys.executable, "-m",
        "ctx_jax.main", "--config", DEMO_SMOKE,
        f"--config.data.records_root={data.parent}", "--workdir",
        str(workdir), "--config.train.num_steps=2",
        "--config.train.valid_every=0", "--config.eval.num_episodes=2",
        timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (workdir / "ckpt" / "2").is_dir()
    assert (workdir / "export" / "model_config.json").is_file()
    results[processes] = json.loads((workdir / "results.json").read_text())
    logs[processes] = [line.split("| acc")[0].removeprefix("[p0] ")
                       for line in proc.stdout.splitlines()
                       if "step 2/2" in line]
  assert results[2] == results[1]
  # Same final loss up to float32 round-off: the cross-process all-reduce
  # sums the devices' partial losses and gradients in another order.
  assert len(logs[1]) == len(logs[2]) == 1
  losses = [float(logs[p][0].split("loss ")[1]) for p in (1, 2)]
  assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def _train_two_processes(data, workdir, num_steps, stop_at=None):
  """ctx-train as 2 processes x 1 CPU device through launch.local.

  With `stop_at`, the launcher gets SIGTERM once step `stop_at` is logged.
  Returns (launcher status, output lines).
  """
  cmd = [sys.executable, "-m", "launch.local", "--num_processes", "2",
         "--platform", "cpu", "--cpu_devices", "1", "--", sys.executable,
         "-m", "ctx_jax.main", "--config", DEMO_SMOKE,
         f"--config.data.records_root={data.parent}", "--workdir",
         str(workdir), f"--config.train.num_steps={num_steps}",
         "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
         "--config.train.valid_every=0", "--config.eval.num_episodes=2"]
  lines = []
  with subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True) as proc:
    try:
      for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if stop_at is not None and f"step {stop_at}/" in line:
          proc.send_signal(signal.SIGTERM)
          stop_at = None
      return proc.wait(timeout=400), lines
    finally:
      if proc.poll() is None:
        proc.kill()


def _final_loss(lines, step):
  loss = [l.split("loss ")[1].split(" ")[0] for l in lines
          if l.startswith("[p0] ") and f"step {step}/{step} " in l]
  assert len(loss) == 1, "\n".join(lines[-40:])
  return float(loss[0])


def test_two_process_preemption_checkpoints_and_resumes(tmp_path):
  """A SIGTERM to the launcher (a scheduler's preemption) reaches both
  processes; JAX's preemption sync makes them checkpoint at the same step
  and exit 143, with no export; running the command again resumes there
  and ends where an uninterrupted run ends."""
  data = fakes.make_tiny_demo(tmp_path / "data")
  workdir = tmp_path / "preempted"
  code, lines = _train_two_processes(data, workdir, 12, stop_at=3)
  out = "\n".join(lines)
  assert code == 143, out[-4000:]
  stops = {l.split("] ")[0]: l.split("at step ")[1].split(";")[0]
           for l in lines if "preempted (SIGTERM) at step" in l}
  assert set(stops) == {"[p0", "[p1"} and len(set(stops.values())) == 1, out
  step = int(stops["[p0"])
  assert 3 <= step < 12
  assert [p.name for p in (workdir / "ckpt").iterdir()
          if p.name.isdigit()] == [str(step)]
  assert not (workdir / "export").exists()

  code, lines = _train_two_processes(data, workdir, 12)
  assert code == 0, "\n".join(lines[-40:])
  assert not any(f"step {s}/" in l for l in lines for s in range(1, step + 1))
  resumed = _final_loss(lines, 12)
  assert (workdir / "export" / "model_config.json").is_file()

  code, lines = _train_two_processes(data, tmp_path / "whole", 12)
  assert code == 0, "\n".join(lines[-40:])
  assert resumed == pytest.approx(_final_loss(lines, 12), rel=1e-5)
