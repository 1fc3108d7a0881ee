"""`dfjax bench simulate`: the per-device cost of patch and sequence parallelism, projected from one device.

One device of an N-device `patch` mesh runs the model (a UNet, DiT or PixArt) on H/N latent rows
with the halo rows, K/V and GroupNorm moments of N devices (sequence methods: the all-to-all and
ring blocks of N devices). This benchmark runs exactly that program on one device for each
registered strategy that splits rows over `patch` and runs the model, in each of its splits of N
devices (`strategy.image_splits`: usp's ring × Ulysses degrees): the steady state of its run (the phase
after any warm-up, `strategy.steady_phase`) with its collectives replaced by local stand-ins of
the same shapes (`simulated=True`, sharding/contexts/simulated.py), and times one UNet step with
classifier-free guidance (batch 2) after compilation; `single` is the reference row. The bytes a
device receives per step (`strategy.expected_traffic`; with --hlo-comm also read from the
compiled N-device sampling program, sharding/accounting/comm.py) over a stated link bandwidth
give the communication time, and with it a projected step time:
  step = max(compute, overlapped comm) + synchronous comm,
the overlapped kinds being those only the next step consumes (`strategy.overlapped_kinds()`: none
for exact; for displaced halos, K/V and, unless GroupNorm is `sync`, the moments).
These are projections, not measurements: bandwidth-bound transfers at the link's full rate (plus
--latency-us per collective), perfect overlap, no contention for the links. Published measurements
are printed beside them: DistriFusion's SDXL speedups (UNet) and the PixArt-α latencies of 8 A100s
(the PipeFusion paper's 20-step DPM-Solver table), each only where the model family matches.
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfjax.bench import table
from dfjax.bench.table import Column
from dfjax.bench.timing import compile_and_time, device_name
from dfjax.bench.models import config_name, model_config
from dfjax.bench.unet import DTYPES, latent_size, parameter_count, random_unet
from dfjax.inputs import standin_conditioning
from dfjax.sampling import lower_sample
from models.config import UNetConfig
from models.dit_config import PixArtConfig
from models.parallel import call_recording
from sharding.accounting import comm
from sharding.axes import PATCH
from sharding.exchange.groupnorm import GroupNormMode
from sharding.mesh import axis_sizes, make_mesh, single_device_mesh
from sharding.strategies import Phase, Strategy, strategy_class, strategy_names, with_shared_options

MIB = 2**20


def simulated_strategies() -> tuple[str, ...]:
  """The registered strategies this bench simulates: those whose method splits rows over `patch` (asked when
  called, so a strategy registered later is one too)."""
  return tuple(name for name in strategy_names() if strategy_class(name).method_axis == PATCH)


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
# parallelism) on N NVLink-connected A100s over one A100; {strategy: {resolution: {N: speedup}}}.
PAPER_SPEEDUPS = {"displaced": {1024: {2: 1.5, 4: 2.2, 8: 2.8}, 2048: {2: 1.8, 4: 3.1, 8: 4.9},
                                3840: {2: 1.8, 4: 3.4, 8: 6.1}}}
# PixArt-α (PipeFusion, Fang et al. 2024): seconds of a 20-step DPM-Solver run on 8 NVLink A100s;
# {resolution: {strategy: seconds}}, `single` on 1 GPU. Their speedups are single / strategy.
PIXART_DEVICES, PIXART_STEPS = 8, 20
PIXART_SECONDS = {1024: {"single": 2.085, "displaced": 0.765, "ulysses": 1.37, "ring": 2.59, "pipefusion": 0.969},
                  2048: {"single": 16.22, "displaced": 2.48, "ulysses": 2.46, "ring": 3.54}}


def published_speedup(config, run) -> float | None:
  """The published speedup of `run`'s strategy at its resolution and N for the model family of `config`."""
  if isinstance(config, UNetConfig):
    return PAPER_SPEEDUPS.get(run.strategy, {}).get(run.resolution, {}).get(run.patch)
  seconds = PIXART_SECONDS.get(run.resolution, {}) if isinstance(config, PixArtConfig) else {}
  if run.patch != PIXART_DEVICES or run.strategy not in seconds:
    return None
  return seconds["single"] / seconds[run.strategy]


def published_seconds(config, run) -> float | None:
  """The published PixArt-α 20-step latency of `run`'s strategy (N = 8; single: 1 GPU), or None."""
  if not isinstance(config, PixArtConfig) or run.patch not in (1, PIXART_DEVICES):
    return None
  name = "single" if run.patch == 1 else run.strategy
  return PIXART_SECONDS.get(run.resolution, {}).get(name)


# ---------------------------------------------------------------------------------- the per-device program

def device_step(graphdef, mesh: Mesh, phase: Phase, latent_spec: P) -> Callable:
  """One UNet forward of `phase` on every device of `mesh`, as a jitted program.

  Returns f(params, x, t, cond, stale) → (eps, sent): `x` and `eps` are (B, H, W, C) laid
  out as `latent_spec`, `cond` the model's conditioning keywords; `stale` (None unless `phase.uses_stale`) and `sent` ({} unless
  `phase.records`) are one device's exchange buffers, as in the sampling loop's scan carry.
  Buffers are only meaningful on a one-device mesh (the simulation): they are returned unsplit.
  """
  def on_device(params, x, t, cond, stale):
    model = nnx.merge(graphdef, params)  # inside the trace: the call records onto its layers
    return call_recording(model, x, t, ctx=phase.context(stale), **cond)  # eps: B, h, W, C

  step = jax.shard_map(on_device, mesh=mesh, in_specs=_specs(latent_spec), out_specs=(latent_spec, P()),
                       check_vma=False)
  return jax.jit(step)


def _specs(latent_spec: P) -> tuple[P, ...]:
  return P(), latent_spec, P(), P(), P()  # params, x, t, cond, stale


def place(mesh: Mesh, latent_spec: P, params, x, t, cond, stale=None) -> tuple:
  """`device_step`'s arguments on `mesh`: x laid out as `latent_spec`, the rest replicated."""
  args = (params, x, t, cond, stale)
  return tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(args, _specs(latent_spec)))


def simulated_sizes(num_patches: int, split: Mapping[str, int] | None = None) -> dict[str, int]:
  """The axis sizes of the mesh one device stands in for: `split` of N devices (default `patch` = N),
  every other axis 1."""
  return axis_sizes(single_device_mesh()) | dict(split or {PATCH: num_patches})


def model_inputs(config, batch: int, height: int, width: int) -> tuple:
  """(x NHWC, timesteps, {conditioning keyword: value}) as fp32 numpy for a UNet, DiT or PixArt."""
  x = np.random.default_rng(0).standard_normal((batch, height, width, config.in_channels), np.float32)
  cond = standin_conditioning(config, batch, (8 * height, 8 * width)).as_kwargs()  # image pixels: VAE ×8
  return x, np.full((batch,), 500.0, np.float32), cond


def steady_run_steps(strategy: Strategy, sizes) -> int:
  """Steps of the shortest run ending in two steps of the steady phase (XLA inlines one-trip loops)."""
  return strategy.steady_phase(sizes).start + 2


def simulated_program(model, height: int, width: int, num_patches: int, strategy: Strategy,
                      split: Mapping[str, int] | None = None) -> tuple:
  """(jitted per-device step, its arguments): one device of `num_patches` (split as `split`, default all
  over `patch`) in `strategy`'s steady phase on a height × width latent."""
  graphdef, params = nnx.split(model)
  mesh, sizes, spec = single_device_mesh(), simulated_sizes(num_patches, split), strategy.latent_spec()
  phases = strategy.phases(steady_run_steps(strategy, sizes), sizes, simulated=True)
  inputs = model_inputs(model.config, 2, height // num_patches, width)
  stale = None
  if phases[-1].uses_stale:  # the carry has the shapes the run's first recording phase sends
    recording = next(p for p in phases if p.records and not p.uses_stale)
    recording_step = device_step(graphdef, mesh, recording, spec)
    shapes = jax.eval_shape(recording_step, *place(mesh, spec, params, *inputs))[1]
    stale = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return device_step(graphdef, mesh, phases[-1], spec), place(mesh, spec, params, *inputs, stale)


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
  mesh: str = ""  # how N splits (usp: ring × Ulysses degrees)

  def comm_s(self, link: Link, latency_s: float) -> tuple[float, float]:
    """(synchronous, overlappable) communication seconds per step over `link`."""
    return comm_seconds(self.sync_bytes, self.async_bytes, self.collectives, link, latency_s)

  def projected_s(self, link: Link, latency_s: float) -> float:
    return projected_step(self.step_s, *self.comm_s(link, latency_s))


def comm_seconds(sync_bytes: float, async_bytes: float, collectives: int, link: Link,
                 latency_s: float) -> tuple[float, float]:
  """(synchronous, overlappable) seconds of a step's communication over `link`; the per-collective
  latency counts where the step waits (with the synchronous bytes if it has any)."""
  sync, overlapped = sync_bytes / link.bytes_per_s, async_bytes / link.bytes_per_s
  per_collective = latency_s * collectives
  return (sync + per_collective, overlapped) if sync_bytes else (sync, overlapped + per_collective)


def projected_step(compute_s: float, sync_s: float, overlapped_s: float) -> float:
  """A step whose overlappable communication hides behind its compute and whose synchronous part does not."""
  return max(compute_s, overlapped_s) + sync_s


def comm_bytes(config, side: int, num_patches: int, strategy: Strategy, activation_bytes: int,
               split: Mapping[str, int] | None = None) -> tuple[int, int, int]:
  """(synchronous bytes, overlappable bytes, collectives) one interior device receives per steady step."""
  sizes = simulated_sizes(num_patches, split)
  volume = strategy.expected_traffic(config, side, side, sizes, 2, activation_bytes)
  overlapped = strategy.overlapped_kinds()
  collectives = strategy.collectives_per_step(config, volume, sizes)
  return (sum(b for kind, b in volume.items() if kind not in overlapped),
          sum(b for kind, b in volume.items() if kind in overlapped), collectives)


def hlo_comm_bytes(model, side: int, num_patches: int, strategy: Strategy,
                   split: Mapping[str, int] | None = None) -> int | None:
  """Per-step bytes one device receives in the compiled N-device sampling program's steady phase."""
  if jax.device_count() < num_patches:
    return None
  mesh = make_mesh(1, 1, **{PATCH: 1, **(split or {PATCH: num_patches})})
  noise = np.zeros((1, side, side, model.config.in_channels), np.float32)
  cond = standin_conditioning(model.config, 1, (8 * side, 8 * side))  # image pixels: VAE ×8
  num_steps = steady_run_steps(strategy, axis_sizes(mesh))
  lowered = lower_sample(model, noise, cond, uncond=cond, num_steps=num_steps, mesh=mesh, strategy=strategy,
                         scheduler_config={"clip_sample": False})
  return comm.traffic_per_step(lowered.compile().as_text())[-1].total_bytes  # the last phase: the steady one


# ---------------------------------------------------------------------------------- the table

def columns(single_s: Mapping[int, float], latency_s: float, config=None) -> tuple[Column, ...]:
  """The printed table's columns; `single_s` maps a resolution to its single-device step time (the
  reference of "vs 1/N" and "×"), filled in as the references are measured. `config` picks the
  published figures (DistriFusion's SDXL speedups for a UNet; PixArt-α's 8-A100 seconds, beside the
  projected 20-step run over A100 NVLink)."""
  paper = [Column("paper ×", lambda run: published_speedup(config, run), ".1f", 7)]
  if isinstance(config, PixArtConfig):
    a100 = LINKS[0]
    paper += [Column("proj. 20 steps s", lambda run: PIXART_STEPS * run.projected_s(a100, latency_s), ".2f", 16),
              Column("paper s", lambda run: published_seconds(config, run), ".2f", 7)]
  return (Column("res", "resolution", width=5), Column("N", "patch", width=2),
          Column("strategy", "strategy", width=9, align="<"), Column("mesh", "mesh", width=17, align="<"),
          Column("compile s", "compile_s", ".1f", 9),
          Column("compute ms", "step_s", ".2f", 10, 1e3),
          Column("vs 1/N", lambda run: run.step_s / (single_s[run.resolution] / run.patch), ".2f", 6),
          Column("comm MiB", lambda run: run.sync_bytes + run.async_bytes, ".1f", 8, 1 / MIB),
          Column("HLO MiB", "hlo_bytes", ".1f", 8, 1 / MIB),
          *(column for link in LINKS for column in _link_columns(link, single_s, latency_s)), *paper)


def _link_columns(link: Link, single_s: Mapping[int, float], latency_s: float) -> list[Column]:
  """The projection over `link`: communication and step time, speedup over the single-device step."""
  projected = lambda run: run.projected_s(link, latency_s)
  return [Column("comm ms", lambda run: sum(run.comm_s(link, latency_s)), ".2f", 7, 1e3, group=link.name),
          Column("step ms", projected, ".2f", 7, 1e3, group=link.name),
          Column("×", lambda run: single_s[run.resolution] / projected(run), ".2f", 5, group=link.name)]


def run(config: str | None, resolutions: list[int], patches: list[int], dtype: str, iters: int,
        strategies: list[str] | None = None, groupnorm: str = "corrected_async", hlo_comm: bool = False,
        latency_us: float = 0.0, model: str = "unet") -> list[SimRun]:
  """Measures, prints and returns every configuration that fits in memory (default: every simulated
  strategy that runs the model)."""
  model_config_ = model_config(model, config)
  if strategies is None:
    strategies = [name for name in simulated_strategies() if strategy_class(name).supports(model_config_)]
  mode = GroupNormMode.parse(groupnorm)
  bad = [name for name in strategies if name not in simulated_strategies()]
  if bad or not strategies:
    raise ValueError(f"unknown strategies {bad} for simulate; valid: {', '.join(simulated_strategies())} (the registered "
                     f"strategies that split rows over {PATCH!r}; single is always the reference row).")
  if any(n < 1 for n in patches) or iters < 1 or latency_us < 0:
    raise ValueError(f"patch counts {patches} must be ≥ 1, --iters {iters} ≥ 1 and --latency-us {latency_us} ≥ 0.")
  patches = sorted(set(patches) - {1})
  chosen = [with_shared_options(name, {"groupnorm": mode}) for name in strategies]
  splits = {(n, s.name): s.image_splits(n) for n in patches for s in chosen}  # usp: each ring × Ulysses split
  for resolution in resolutions:  # every size is checked before anything is built
    side = latent_size(model_config_, resolution)
    for num_patches in patches:
      latent_size(model_config_, resolution, num_patches)  # with the advice in pixels
      for strategy in chosen:
        for split in splits[num_patches, strategy.name]:
          strategy.validate(model_config_, side, side, simulated_sizes(num_patches, split))

  jdtype = DTYPES[dtype]
  denoiser = random_unet(model_config_, jdtype)
  latency_s = latency_us * 1e-6
  print(f"simulate: {config_name(model, config)} ({parameter_count(denoiser) / 1e9:.3f} B parameters), one model "
        f"step with CFG (batch 2), {dtype}, random weights; compute measured on {device_name()}, one device "
        f"running one patch device's program in the steady state, after any warm-up (median of {iters}); "
        f"{'; '.join(strategy.summary() for strategy in chosen)}")
  for link in LINKS:
    print(f"  link {link.name}: {link.bytes_per_s / 1e9:.0f} GB/s per GPU per direction ({link.source})")
  overlapped = {s.name: ", ".join(sorted(s.overlapped_kinds())) or "nothing" for s in chosen}
  overlaps = "; ".join(f"{name} overlaps {kinds}" for name, kinds in overlapped.items())
  print(f"  PROJECTIONS: step = max(compute, overlapped comm) + synchronous comm ({overlaps}); comm = bytes "
        f"received per step / link bandwidth + {latency_us:g} µs per collective; × = speedup over the "
        f"single-device step on this machine; {_published_source(model_config_)}")
  single_s = {}
  printed = columns(single_s, latency_s, model_config_)
  print(table.header(printed))
  runs = []
  activation_bytes = np.dtype(jdtype).itemsize
  for resolution in resolutions:
    side = resolution // 8
    single = _measure(denoiser, resolution, side, 1, Strategy.single(), iters)
    if single is None:
      continue
    single_s[resolution] = single.step_s
    print(table.line(printed, single), flush=True)
    runs.append(single)
    for num_patches in patches:
      for strategy in chosen:
        for split in splits[num_patches, strategy.name]:
          measured = _measure(denoiser, resolution, side, num_patches, strategy, iters, split)
          if measured is None:
            continue
          sync, overlapped, collectives = comm_bytes(model_config_, side, num_patches, strategy, activation_bytes,
                                                     split)
          hlo = hlo_comm_bytes(denoiser, side, num_patches, strategy, split) if hlo_comm else None
          runs.append(dataclasses.replace(measured, sync_bytes=sync, async_bytes=overlapped,
                                          collectives=collectives, hlo_bytes=hlo))
          print(table.line(printed, runs[-1]), flush=True)
  print("compute: the per-device program alone on one device; vs 1/N: compute over (single step / N); comm MiB: "
        "bytes one interior device receives per step (analytic); HLO MiB: the same read from the compiled "
        "N-device program's steady phase (--hlo-comm, needs N devices).")
  if jax.devices()[0].platform == "cpu":
    print("On a CPU the compute is CPU time: these projections only exercise the harness; they say nothing "
          "about GPUs.")
  return runs


def _published_source(config) -> str:
  if isinstance(config, UNetConfig):
    return "paper × = DistriFusion's measured SDXL speedups on A100s"
  if isinstance(config, PixArtConfig):
    return (f"paper s = PixArt-α's measured {PIXART_STEPS}-step DPM-Solver seconds (PipeFusion paper: 1 A100 "
            f"for single, {PIXART_DEVICES} NVLink A100s otherwise), paper × = single / strategy; proj. 20 steps "
            f"s = {PIXART_STEPS} × the projected A100 step (the model's whole step, no VAE or text encoder)")
  return "no published figures for this model family"


def _measure(model, resolution: int, side: int, num_patches: int, strategy: Strategy, iters: int,
             split: Mapping[str, int] | None = None) -> SimRun | None:
  """Times one configuration; None (with a printed note) when it does not fit in device memory."""
  mesh = describe_split(split or {PATCH: num_patches}) if num_patches > 1 else ""
  try:
    step, args = simulated_program(model, side, side, num_patches, strategy, split)
    timed = compile_and_time(step.lower(*args), args, iters, warmup=1)
  except (jax.errors.JaxRuntimeError, MemoryError) as error:
    if not is_out_of_memory(error):
      raise
    first_line = str(error).strip().splitlines()[0][:160]
    print(f"{resolution} N={num_patches} {strategy.name} {mesh} skipped: does not fit in device memory "
          f"({first_line})", flush=True)
    return None
  return SimRun(resolution, num_patches, strategy.name, timed.compile_s, timed.run_s, mesh=mesh)


def describe_split(split: Mapping[str, int]) -> str:
  """E.g. 'patch=2×ulysses=4' (usp's ring × Ulysses degrees), outer axis first."""
  return "×".join(f"{axis}={size}" for axis, size in split.items())
