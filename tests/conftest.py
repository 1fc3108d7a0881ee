"""Every test sees 8 virtual CPU devices; set before jax is first used."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Backend optimisation level 0 halves XLA:CPU compile times; the tiny test programs run fast anyway.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def returned(monkeypatch):
  """returned(module, "run") → a list each later call of module.run appends its return value to: the rows a
  command printed its table from, for tests to read as data."""
  def spy(module, name: str) -> list:
    values, original = [], getattr(module, name)

    def recording(*args, **kwargs):
      values.append(original(*args, **kwargs))
      return values[-1]

    monkeypatch.setattr(module, name, recording)
    return values
  return spy
