"""Project XLA defaults: the CPU convolution flag and the compile cache."""

import json
import logging
import os
import pathlib
import subprocess
import sys

from ctx_jax import xla_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG = xla_config.CPU_CONV_FLAG


def _no_probe(flag):
  raise AssertionError(f"measured versions need no probe ({flag})")


def test_measured_jaxlib_versions_get_their_setting():
  # The table's choice, without probing the library.
  for version in ("0.10.2", "0.11.2", "0.12.0.1", "0.12.0"):
    env = {}
    assert xla_config.default_xla_flags(env, version=version,
                                        knows_flag=_no_probe) == FLAG
    assert env["XLA_FLAGS"] == FLAG
    assert xla_config.applied()["setting"] == "eigen"
  assert xla_config.cpu_conv_choice("0.11.2", _no_probe).measured


def test_every_measured_setting_is_a_known_setting():
  assert set(xla_config.MEASURED_CPU_CONV.values()) <= set(
      xla_config.CPU_CONV_SETTINGS)


def test_unmeasured_newer_jaxlib_probes_the_flag_and_logs(caplog):
  # A future jaxlib: the newest measured setting if its flag still exists.
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  probed = []
  with caplog.at_level(logging.WARNING, logger="ctx_jax.xla_config"):
    added = xla_config.default_xla_flags(
        env, version="0.13.1", knows_flag=lambda f: probed.append(f) or True)
  assert added == FLAG and probed == [FLAG]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
  assert "eigen" in caplog.text and "0.13.1 was not measured" in caplog.text
  # ... and jaxlib's own kernels (no flag: XLA would abort) if it is gone.
  caplog.clear()
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  with caplog.at_level(logging.WARNING, logger="ctx_jax.xla_config"):
    assert xla_config.default_xla_flags(
        env, version="1.0.0", knows_flag=lambda f: False) is None
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  assert xla_config.applied()["setting"] == "jaxlib"
  assert "jaxlib (" in caplog.text and "does not know" in caplog.text


def test_older_or_missing_jaxlib_gets_no_flag():
  for version in ("0.9.2", "0.4.38", "", "dev"):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_config.default_xla_flags(env, version=version,
                                        knows_flag=_no_probe) is None
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_flag_keeps_other_flags_and_yields_to_the_user():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  xla_config.default_xla_flags(env, version="0.10.2")
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
  mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  for version in ("0.10.2", "0.12.0.1", "0.13.0"):
    env = {"XLA_FLAGS": mine}
    assert xla_config.default_xla_flags(env, version=version,
                                        knows_flag=lambda f: True) is None
    assert env["XLA_FLAGS"] == mine
    assert "the user wins" in xla_config.applied()["reason"]
  env = {"CTX_JAX_XLA_DEFAULTS": "0"}
  assert xla_config.default_xla_flags(env, version="0.12.0.1") is None
  assert "XLA_FLAGS" not in env
  assert xla_config.applied()["setting"] is None


def test_probe_reads_the_installed_jaxlib():
  # Every supported jaxlib defines the flag; nothing defines a made-up one.
  assert xla_config.jaxlib_knows_flag(FLAG)
  assert not xla_config.jaxlib_knows_flag("--xla_cpu_no_such_flag_ctx=1")


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
  expected = xla_config.cpu_conv_choice(xla_config.jaxlib_version()).flag
  assert flags.strip() == (expected or "")
  # Every supported jaxlib is in the measured table.
  assert expected == FLAG


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
