"""Every test sees 8 virtual CPU devices; set before jax is first used."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Backend optimisation level 0 halves XLA:CPU compile times; the tiny test programs run fast anyway.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
