"""`dfjax bench simulate`: the per-device cost of patch parallelism, projected from one device.

One device of an N-device `patch` mesh runs the UNet on H/N latent rows with the halo rows, K/V
and GroupNorm moments of N devices. This benchmark runs exactly that program on one device, the
collectives replaced by local stand-ins of the same shapes (sharding/simulated.py), and times one
UNet step with classifier-free guidance (batch 2) after compilation, for
  exact      synchronous patch parallelism: each exchange is used as soon as it arrives;
  displaced  DistriFusion: the previous step's exchanges come in as inputs, this step's go out.
The bytes a device receives per step (sharding/analytic.py; with --hlo-comm also read from the
compiled N-device program, sharding/comm.py) over a stated link bandwidth give the communication
time, and with it a projected step time:
  exact      compute + communication (every collective has a consumer inside the step);
  displaced  max(compute, communication) (no collective does; `sync` GroupNorm moments excepted).
These are projections, not measurements: bandwidth-bound transfers at the link's full rate (plus
--latency-us per collective), perfect overlap for displaced, no contention for the links.
"""

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.bench.timing import block, device_name, median_seconds
from dfjax.bench.unet import DTYPES, latent_size, load_config, parameter_count, random_unet, unet_inputs
from dfjax.sampling import Conditioning, lower_sample
from models.config import UNetConfig
from sharding import analytic, comm
from sharding.context import SINGLE_DEVICE, ParallelContext
from sharding.groupnorm import GroupNormMode
from sharding.mesh import make_mesh, single_device_mesh
from sharding.simulated import SimulatedPatchContext
from sharding.strategy import PATCH_AXIS, Strategy

MIB = 2**20
KINDS = ("exact", "displaced")


@dataclasses.dataclass(frozen=True)
class Link:
  name: str
  bytes_per_s: float  # per GPU, per direction: what one device can receive
  source: str


LINKS = (
    Link("A100 NVLink3", 300e9, "A100 SXM4: 12 NVLink3 links × 25 GB/s per direction (600 GB/s both ways), "
         "the DGX A100 of DistriFusion's measurements"),
    Link("H100 NVLink4", 450e9, "H100 SXM5: 18 NVLink4 links × 25 GB/s per direction (900 GB/s both ways)"),
)
# DistriFusion (Li et al., CVPR 2024): SDXL, measured speedup of DistriFusion (displaced patch
# parallelism) on N NVLink-connected A100s over one A100; {resolution: {N: speedup}}.
PAPER_SPEEDUPS = {1024: {2: 1.5, 4: 2.2, 8: 2.8}, 2048: {2: 1.8, 4: 3.1, 8: 4.9}, 3840: {2: 1.8, 4: 3.4, 8: 6.1}}


# ---------------------------------------------------------------------------------- the per-device program

def unet_step(graphdef, mesh: Mesh, context: Callable[[dict | None, dict | None], ParallelContext],
              records: bool = False) -> Callable:
  """One UNet forward on every device of `mesh`, as a jitted program.

  Returns f(params, x, t, text, extra, stale) → (eps, record): `x` and `eps` are (B, H, W, C)
  split by rows over `patch`; `stale` (None for a synchronous step) and `record` (None unless
  `records`) are one device's exchange buffers, as in the sampling loop's scan carry. Buffers
  are only meaningful on a one-device mesh (the simulation): they are returned unsplit.
  """
  def on_device(params, x, t, text, extra, stale):
    record = {} if records else None
    eps = nnx.merge(graphdef, params)(x, t, text, **extra, ctx=context(stale, record))  # B, h, W, C
    return eps, record

  return jax.jit(jax.shard_map(on_device, mesh=mesh, in_specs=STEP_SPECS, out_specs=(ROWS, P()), check_vma=False))


ROWS = P(None, PATCH_AXIS)
STEP_SPECS = (P(), ROWS, P(), P(), P(), P())  # params, x, t, text, extra, stale


def place(mesh: Mesh, params, x, t, text, extra, stale=None) -> tuple:
  """`unet_step`'s arguments on `mesh`: x split by rows, the rest replicated."""
  args = (params, x, t, text, extra, stale)
  return tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, STEP_SPECS))


def simulated_context(num_patches: int, kind: str, groupnorm: GroupNormMode = GroupNormMode.CORRECTED_ASYNC):
  """(stale, record) → the context of one interior device of `num_patches` for `kind`."""
  match kind:
    case "single":
      return lambda stale, record: SINGLE_DEVICE
    case "exact":
      return lambda stale, record: SimulatedPatchContext(PATCH_AXIS, num_patches, GroupNormMode.SYNC, stale, record)
    case "displaced":
      return lambda stale, record: SimulatedPatchContext(PATCH_AXIS, num_patches, groupnorm, stale, record)
    case _:
      raise ValueError(f"unknown simulated strategy {kind!r}; valid: single, {', '.join(KINDS)}.")


def simulated_program(model, height: int, width: int, num_patches: int, kind: str, groupnorm: GroupNormMode):
  """(jitted per-device step, its arguments) for one device of `num_patches` on a height × width latent."""
  config, (graphdef, params) = model.config, nnx.split(model)
  mesh = single_device_mesh()
  inputs = unet_inputs(config, 2, height // num_patches, width)
  stale = None
  if kind == "displaced":  # the stale inputs have the shapes a synchronous step records
    recording = unet_step(graphdef, mesh, simulated_context(num_patches, kind, groupnorm), records=True)
    shapes = jax.eval_shape(recording, *place(mesh, params, *inputs))[1]
    stale = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  step = unet_step(graphdef, mesh, simulated_context(num_patches, kind, groupnorm), records=kind == "displaced")
  return step, place(mesh, params, *inputs, stale)


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------------------------- measurement

@dataclasses.dataclass(frozen=True)
class SimRun:
  """One configuration: measured per-device compute and the communication it would add.

  `sync_bytes` must arrive before the step can finish; `async_bytes` may overlap with compute.
  """

  resolution: int
  patch: int
  strategy: str
  compile_s: float
  step_s: float
  sync_bytes: int = 0
  async_bytes: int = 0
  collectives: int = 0
  hlo_bytes: int | None = None

  def comm_s(self, link: Link, latency_s: float) -> tuple[float, float]:
    """(synchronous, overlappable) communication seconds per step over `link`."""
    sync = self.sync_bytes / link.bytes_per_s
    overlapped = self.async_bytes / link.bytes_per_s
    per_collective = latency_s * self.collectives
    return (sync + per_collective, overlapped) if self.sync_bytes else (sync, overlapped + per_collective)

  def projected_s(self, link: Link, latency_s: float) -> float:
    sync, overlapped = self.comm_s(link, latency_s)
    return max(self.step_s, overlapped) + sync


def _time(step, args, iters: int) -> tuple[float, float]:
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  return compile_s, median_seconds(lambda: block(compiled(*args)), iters)


def comm_bytes(config: UNetConfig, side: int, num_patches: int, kind: str, groupnorm: GroupNormMode,
               activation_bytes: int) -> tuple[int, int, int]:
  """(synchronous bytes, overlappable bytes, collectives) one interior device receives per step."""
  volume = analytic.bytes_per_step(config, side, side, num_patches, 2, activation_bytes)
  counts = {"halo": 2, "kv": 1, "moments": 1}  # collectives per exchange site: halo = up + down
  sites = analytic.exchange_sites(config)
  if kind == "displaced" and groupnorm is GroupNormMode.SEPARATE:
    volume.pop("moments")
    sites = [s for s in sites if s.kind != "moments"]
  collectives = sum(counts[s.kind] for s in sites)
  if kind == "exact":
    return sum(volume.values()), 0, collectives
  moments = volume.pop("moments", 0) if groupnorm is GroupNormMode.SYNC else 0
  return moments, sum(volume.values()), collectives


def hlo_comm_bytes(model, side: int, num_patches: int, kind: str, groupnorm: GroupNormMode) -> int | None:
  """Per-step bytes one device receives in the compiled N-device sampling program (last phase)."""
  if jax.device_count() < num_patches:
    return None
  _, _, text, extra = unet_inputs(model.config, 1, side, side)
  noise = np.random.default_rng(1).standard_normal((1, side, side, model.config.in_channels), np.float32)
  cond = Conditioning(text, **extra)
  strategy = Strategy.exact() if kind == "exact" else Strategy.displaced(warmup_steps=1, groupnorm=groupnorm)
  lowered = lower_sample(model, noise, cond, uncond=cond, num_steps=3, mesh=make_mesh(1, 1, num_patches),
                         strategy=strategy, scheduler_config={"clip_sample": False})
  return comm.traffic_per_step(lowered.compile().as_text())[-1].total_bytes


# ---------------------------------------------------------------------------------- the table

def _cell(value, spec: str, width: int) -> str:
  return f"{'-' if value is None else format(value, spec):>{width}}"


HEADER = (f"{'res':>5} {'N':>2} {'strategy':<9} {'compile s':>9} {'compute ms':>10} {'vs 1/N':>6} "
          f"{'comm MiB':>8} {'HLO MiB':>8} " + " ".join(f"| {link.name:<21}" for link in LINKS) + " | paper")
SUBHEADER = " " * HEADER.index("|") + " ".join(f"| {'comm ms':>7} {'step ms':>7} {'×':>5}" for _ in LINKS) + " | 8×A100"


def _row(run: SimRun, single_s: float, latency_s: float) -> str:
  cells = [f"{run.resolution:>5} {run.patch:>2} {run.strategy:<9} {run.compile_s:9.1f} {run.step_s * 1e3:10.2f}",
           _cell(run.step_s / (single_s / run.patch) if run.patch > 1 else None, ".2f", 6),
           _cell((run.sync_bytes + run.async_bytes) / MIB if run.patch > 1 else None, ".1f", 8),
           _cell(run.hlo_bytes and run.hlo_bytes / MIB, ".1f", 8)]
  for link in LINKS:
    if run.patch == 1:
      cells.append(f"| {'-':>7} {run.step_s * 1e3:7.2f} {'1.00':>5}")
      continue
    projected = run.projected_s(link, latency_s)
    cells.append(f"| {sum(run.comm_s(link, latency_s)) * 1e3:7.2f} {projected * 1e3:7.2f} {single_s / projected:5.2f}")
  paper = PAPER_SPEEDUPS.get(run.resolution, {}).get(run.patch) if run.strategy == "displaced" else None
  cells.append(f"| {_cell(paper, '.1f', 5)}")
  return " ".join(cells)


def run(config: str, resolutions: list[int], patches: list[int], dtype: str, iters: int,
        strategies: list[str] = KINDS, groupnorm: str = "corrected_async", hlo_comm: bool = False,
        latency_us: float = 0.0) -> list[SimRun]:
  """Measures, prints and returns every configuration that fits in memory."""
  unet_config = UNetConfig.from_diffusers_config(load_config(config))
  mode = GroupNormMode.parse(groupnorm)
  bad = [s for s in strategies if s not in KINDS]
  if bad or not strategies:
    raise ValueError(f"unknown strategies {bad}; valid: {', '.join(KINDS)}.")
  if any(n < 1 for n in patches) or iters < 1 or latency_us < 0:
    raise ValueError(f"patch counts {patches} must be ≥ 1, --iters {iters} ≥ 1 and --latency-us {latency_us} ≥ 0.")
  patches = sorted(set(patches) - {1})
  for resolution in resolutions:  # every size is checked before anything is built
    for num_patches in [1, *patches]:
      latent_size(unet_config, resolution, num_patches)

  jdtype = DTYPES[dtype]
  model = random_unet(unet_config, jdtype)
  latency_s = latency_us * 1e-6
  print(f"simulate: UNet {config} ({parameter_count(model) / 1e9:.3f} B parameters), one UNet step with CFG "
        f"(batch 2), {dtype}, random weights; compute measured on {device_name()}, one device running one "
        f"patch device's program (median of {iters}); displaced GroupNorm: {mode.value}")
  for link in LINKS:
    print(f"  link {link.name}: {link.bytes_per_s / 1e9:.0f} GB/s per GPU per direction ({link.source})")
  print(f"  PROJECTIONS: exact = compute + comm, displaced = max(compute, comm); comm = bytes received per step / "
        f"link bandwidth + {latency_us:g} µs per collective; × = speedup over the single-device step on this machine; "
        "paper = DistriFusion's measured SDXL speedups on A100s")
  print(HEADER)
  print(SUBHEADER)
  runs = []
  for resolution in resolutions:
    side = resolution // 8
    single = _measure(model, resolution, side, 1, "single", mode, iters)
    if single is None:
      continue
    print(_row(single, single.step_s, latency_s), flush=True)
    runs.append(single)
    for num_patches in patches:
      for kind in strategies:
        measured = _measure(model, resolution, side, num_patches, kind, mode, iters)
        if measured is None:
          continue
        sync, overlapped, collectives = comm_bytes(unet_config, side, num_patches, kind, mode,
                                                   np.dtype(jdtype).itemsize)
        hlo = hlo_comm_bytes(model, side, num_patches, kind, mode) if hlo_comm else None
        runs.append(dataclasses.replace(measured, sync_bytes=sync, async_bytes=overlapped,
                                        collectives=collectives, hlo_bytes=hlo))
        print(_row(runs[-1], single.step_s, latency_s), flush=True)
  print("compute: the per-device program alone on one device; vs 1/N: compute over (single step / N); comm MiB: "
        "bytes one interior device receives per step (analytic); HLO MiB: the same read from the compiled "
        "N-device program (--hlo-comm, needs N devices).")
  if jax.devices()[0].platform == "cpu":
    print("On a CPU the compute is CPU time: these projections only exercise the harness; they say nothing "
          "about GPUs.")
  return runs


def _measure(model, resolution: int, side: int, num_patches: int, kind: str, mode: GroupNormMode,
             iters: int) -> SimRun | None:
  """Times one configuration; None (with a printed note) when it does not fit in device memory."""
  try:
    step, args = simulated_program(model, side, side, num_patches, kind, mode)
    compile_s, step_s = _time(step, args, iters)
  except (jax.errors.JaxRuntimeError, MemoryError) as error:
    if not is_out_of_memory(error):
      raise
    first_line = str(error).strip().splitlines()[0][:160]
    print(f"{resolution:>5} {num_patches:>2} {kind:<9} skipped: does not fit in device memory ({first_line})",
          flush=True)
    return None
  return SimRun(resolution, num_patches, kind, compile_s, step_s)
