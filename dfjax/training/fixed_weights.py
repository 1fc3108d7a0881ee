"""The fixed-seed weights of the frozen stand-in models (the VAE encoder, the caption text encoder)."""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # a third of the compile time, slower code


@functools.cache
def fixed_seed_params(module: type[nnx.Module], config: Any, seed: int) -> nnx.State:
  """`module(config, rngs=nnx.Rngs(seed))`'s params, on the host.

  Made once by one program, so that every run (and every program that reads them) has the same bits:
  built eagerly, every initialiser would compile on its own (minutes on a loaded 2-core machine).
  Evaluated now even when first asked inside a trace."""
  make = jax.jit(lambda: nnx.state(module(config, rngs=nnx.Rngs(seed)), nnx.Param), compiler_options=FAST_COMPILE)
  with jax.ensure_compile_time_eval():
    return jax.device_get(make())
