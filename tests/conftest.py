"""Test set-up: 8 fake CPU devices for sharding tests, and the shared data folder."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
PARITY = os.path.join(SHARED, "data", "parity")
SPEECH = os.path.join(SHARED, "data", "speech")


def require_dir(path: str) -> str:
  if not os.path.isdir(path):
    pytest.skip(f"test data folder {path} is absent (it lives in ../shared beside the checkout)")
  return path


@pytest.fixture
def parity_dir():
  return require_dir(PARITY)


@pytest.fixture
def speech_dir():
  return require_dir(SPEECH)
