"""The test environment itself: fake devices are visible."""

import jax


def test_eight_cpu_devices():
  assert jax.device_count() == 8
  assert jax.devices()[0].platform == "cpu"
