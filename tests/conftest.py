"""Test setup: 8 CPU devices (set before JAX is imported), one XLA compilation cache shared by
the test processes, and a shared data directory."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # The tests compile the same tiny models in many processes (xdist workers, main.py runs,
  # notebook kernels): with JAX's persistent cache all but the first reuse the executable. The
  # process that loads this first (the xdist controller) makes the directory; the workers and
  # the processes they start inherit it through the environment.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitjax-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  _OWNS_CACHE = True
else:
  _OWNS_CACHE = False

import pytest  # noqa: E402


def pytest_sessionfinish(session):
  del session
  if _OWNS_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One tfds data dir per test session; the digits are built there on first use."""
  return str(tmp_path_factory.mktemp("tfds"))
