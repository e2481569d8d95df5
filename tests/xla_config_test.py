"""Project XLA defaults: the CPU convolution flag and the compile cache."""

import json
import os
import pathlib
import subprocess
import sys

from ctx_jax import xla_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG = xla_config.CPU_CONV_FLAG


def test_flag_added_only_for_known_jaxlib_versions():
  env = {}
  assert xla_config.default_xla_flags(env, version="0.10.2") == FLAG
  assert env["XLA_FLAGS"] == FLAG
  # Unknown versions: XLA would abort on an unknown flag, so none is added.
  for version in ("0.11.0", "0.9.9", ""):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_config.default_xla_flags(env, version=version) is None
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_flag_keeps_other_flags_and_yields_to_the_user():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  xla_config.default_xla_flags(env, version="0.10.2")
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  env = {"XLA_FLAGS": mine}
  assert xla_config.default_xla_flags(env, version="0.10.2") is None
  assert env["XLA_FLAGS"] == mine
  env = {"CTX_JAX_XLA_DEFAULTS": "0"}
  assert xla_config.default_xla_flags(env, version="0.10.2") is None
  assert "XLA_FLAGS" not in env


def test_installed_jaxlib_accepts_the_flag():
  # A fresh process: importing ctx_jax sets the flag before JAX starts, and
  # XLA:CPU (which aborts on unknown flags) compiles a convolution with it.
  code = (
      "import os, ctx_jax, jax, jax.numpy as jnp\n"
      "x = jnp.ones((2, 8, 8, 3)); k = jnp.ones((3, 3, 3, 4))\n"
      "y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', "
      "dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
      "print(float(y.sum()), os.environ.get('XLA_FLAGS', ''))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  total, flags = out.split(" ", 1)
  # All ones: each output is 3 channels x the taps inside the image; the
  # taps per axis sum to 8*3 - 2 over the 8 positions.
  assert float(total) == 2 * 4 * 3 * (8 * 3 - 2) ** 2
  expected = FLAG if xla_config.jaxlib_version().startswith("0.10.") else ""
  assert flags.strip() == expected


def test_compilation_cache_is_shared_by_two_processes(tmp_path):
  cache = tmp_path / "cache"

  def run():
    cmd = [sys.executable, str(ROOT / "benchmarks/compile_cache_bench.py"),
           "--worker", "--config", "experiments/demo.py:smoke",
           "--cache_dir", str(cache), "--support", "2", "--query", "4",
           "--ways", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])

  first, second = run(), run()
  assert first["cache_misses"] >= 1 and first["cache_hits"] == 0
  assert any(cache.iterdir())
  # The second process loads every program the step needs.
  assert second["cache_misses"] == 0 and second["cache_hits"] >= 1
  assert second["loss"] == first["loss"]


def test_enable_compilation_cache_off_and_default(tmp_path, monkeypatch):
  assert xla_config.enable_compilation_cache("none") is None
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert xla_config.default_cache_dir() == str(tmp_path / "ctx_jax" /
                                               "jax_cache")
