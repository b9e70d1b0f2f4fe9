"""Test setup: 8 CPU devices (set before JAX is imported) and a shared data directory."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data dir per test session; the digits are built there on first use."""
  return str(tmp_path_factory.mktemp("tfds"))
