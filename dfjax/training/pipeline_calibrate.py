"""DiffusionPipe's cost calibration: each backbone segment's forward and backward timed once on this device.

The partitioner and the bubble filler (dfjax/training/pipeline_schedule.py) take per-segment costs;
by default analytic FLOPs (`pipeline_plan.analytic_costs`, the backward at twice the forward).
`timed_costs` measures them instead, as the executor runs them: the forward of one micro-batch
through the segment, and the backward as the executor's B pass does it (the forward recomputed,
then its `jax.vjp`) — each compiled alone, run once to warm up, then timed (the median of a few
runs, as one run on a shared CPU is noise). `describe_costs` prints both side by side.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfjax.training.loop import FAST_COMPILE
from dfjax.training.pipeline_backbone import Backbone
from models.parallel import SINGLE_DEVICE


def _seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compiles and warms up
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - began)
  return float(np.median(times))


@functools.lru_cache(maxsize=16)
def timed_costs(model: str, image_shape: tuple[int, ...], microbatch: int, frozen_text: str = "none", *,
                repeats: int = 3, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(forward, backward) seconds per micro-batch of each segment of `model`'s UNet or DiT on the default
  device (`frozen_text`: its context the captions' tokens); timed once per process (the schedules
  `dfjax bench train` compares share one timing)."""
  backbone = Backbone.of(model, frozen_text)
  options = FAST_COMPILE if backbone.spec.fast_compile else None  # the executor's compiled code, not faster code
  denoiser = backbone.build(rngs=nnx.Rngs(jax.random.key(seed))).denoiser
  graphdef, params = nnx.split(denoiser, nnx.Param)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((microbatch, *image_shape)), jnp.float32)
  shape = backbone.condition_shape(microbatch)  # class tokens (random) or labels (class 0)
  condition = (jnp.asarray(rng.standard_normal(shape.shape), shape.dtype) if shape.dtype == jnp.float32
               else jnp.zeros(shape.shape, shape.dtype))
  carry = backbone.first_carry(denoiser, x, jnp.full((microbatch,), 500, jnp.int32), condition)
  forward, backward = [], []
  for index in range(len(denoiser.segments())):
    def segment(params, carry, index=index):
      return nnx.merge(graphdef, params).segments()[index](carry, ctx=SINGLE_DEVICE)

    def pullback(params, carry, cotangent, segment=segment):
      return jax.vjp(segment, params, carry)[1](cotangent)

    run = jax.jit(segment, compiler_options=options)
    out = run(params, carry)
    forward.append(_seconds(run, params, carry, repeats=repeats))
    cotangent = jax.tree.map(jnp.ones_like, out)
    backward.append(_seconds(jax.jit(pullback, compiler_options=options), params, carry, cotangent, repeats=repeats))
    carry = out
  return tuple(forward), tuple(backward)


def describe_costs(names: Sequence[str], analytic: Sequence[float], timed: tuple[Sequence[float], Sequence[float]]
                   ) -> str:
  """One line per segment: its analytic forward FLOPs and its timed forward and backward, each also
  as a share of the model's total (the shares are what the partitioner compares)."""
  forward, backward = timed
  total_flops, total_forward, total_backward = sum(analytic) or 1.0, sum(forward) or 1.0, sum(backward) or 1.0
  width = max(len(n) for n in names)
  lines = [f"{'segment':<{width}}  {'forward MFLOP':>13} {'share':>6}  {'timed forward ms':>16} {'share':>6}  "
           f"{'timed backward ms':>17} {'share':>6}"]
  for name, flops, f, b in zip(names, analytic, forward, backward, strict=True):
    lines.append(f"{name:<{width}}  {flops / 1e6:13.3f} {100 * flops / total_flops:5.1f}%  {1e3 * f:16.3f} "
                 f"{100 * f / total_forward:5.1f}%  {1e3 * b:17.3f} {100 * b / total_backward:5.1f}%")
  return "\n".join(lines)
