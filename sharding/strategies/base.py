"""What every strategy is: the `Strategy` base class, its phases, and the registry by name.

A strategy says how one image's denoising is spread over the mesh. Each method is one module of
this package with one subclass of `Strategy`, which owns everything about the method:
  * `name`, `description` and `axes` (the mesh axes it splits one image over, beyond data/cfg;
    `tensor` among them when its contexts compose with tensor parallelism, see tensor.py);
  * `families`: the model configs it runs (`supports`), and `image_splits`: the ways it can split
    one image over n devices;
  * `validate`: whether a model, latent size and mesh fit it, with the valid choices named;
  * `phases`: consecutive steps that share one parallel context and so one `lax.scan` body
    (the same phases with simulated collectives for `bench simulate`); a phase that is not one
    model call under one context (a pipeline over `stage`) brings its own `step` program;
  * `stage_of_segment` (and `stage_of_device`): pipeline methods place each model segment's params
    on one stage (sharding/stage_params.py) instead of by the rule table of `param_rules`;
  * `expected_traffic` and `stale_bytes`: its analytic bytes per step and stale state per device;
  * `summary`: one line naming it with its options, for reports (`detail`: what it makes of a model).
Subclassing registers the class under its `name` (`Strategy.from_name`, the CLI's choices), and
as a constructor on the base class: `Strategy.displaced(warmup_steps=4)` is the `Displaced` class
called with those options. Code outside `sharding/` asks these methods and never branches on a
strategy's name, so a new method is one new module here, imported by `sharding/strategies/__init__`.

Strategies are frozen dataclasses: hashable, so a strategy is part of the jit cache key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

from jax.sharding import PartitionSpec as P

from models.config import UNetConfig
from models.dit_config import DiTConfig, PixArtConfig
from models.parallel import ParallelContext
from sharding.accounting import analytic
from sharding.axes import CFG, DATA, MESH_AXES, PATCH, TENSOR
from sharding.partitioning import AxisRules, check_tensor_degree

Stale = Mapping[str, Any]  # {layer key: what it sent the previous step}


class StepProgram(Protocol):
  """A phase's own denoising step, for methods that are not one model call under one context.

  `step(run, x, sched_state, stale, i)` → (next latents, next scheduler state, what to carry to the
  next step). `run` is the device's run (dfjax/sampling.py): `run.sched` the scheduler, `run.config`,
  `run.model(stage)` the model merged from this device's params (its stage's, under a staged
  layout), `run.model_inputs(x)` the guidance pair's batch and conditioning, `run.guided(out, x)`
  the guided noise prediction of a model output for latents `x`, `run.layout` what crosses each cut
  of a staged model (sharding/stage_carry.py; None unless `stages_make_conditioning`).
  """

  def __call__(self, run, x, sched_state, stale: Stale | None, i) -> tuple[Any, Any, Stale]:
    ...


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps [start, stop) and how each of them runs.

  Attributes:
    context: stale state (None unless `uses_stale`) → the step's parallel context, under which the
      model is called once per step and the scheduler steps with its guided prediction.
    uses_stale: the steps consume the previous step's exchanges (the scan carry).
    records: the steps send exchanges for the next step.
    step: instead of that model call under `context`, the phase's own step program (pipelines).
    stride: steps one call of `step` advances (called at start, start + stride, …; AsyncDiff's stride 2).
    finish: `finish(run, x, sched_state, stale)` → (x, sched_state), run after the phase's last step:
      the work a step program leaves to the next step (a scheduler update it defers, so that no step
      consumes what it sent), done once the phase has no next step.
  """

  start: int
  stop: int
  context: Callable[[Stale | None], ParallelContext] | None = None
  uses_stale: bool = False
  records: bool = False
  step: StepProgram | None = None
  stride: int = 1
  finish: Callable[..., tuple[Any, Any]] | None = None

  def __post_init__(self):
    if (self.context is None) == (self.step is None):
      raise ValueError("a Phase runs either its model call under `context` or its own `step`: give one.")
    if self.stride != 1 and self.step is None:
      raise ValueError(f"stride={self.stride}: only a phase's own `step` program advances several steps per call.")


_REGISTRY: dict[str, type[Strategy]] = {}
MODEL_FAMILIES = frozenset({UNetConfig, DiTConfig, PixArtConfig})  # the model configs dfjax builds
_LONGEST_RUN = 2**31 - 1  # the scan counts steps in int32: no run is longer


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How one image's denoising is spread over the mesh. Build with `Strategy.<name>(...)` or `from_name`."""

  name: ClassVar[str] = ""
  description: ClassVar[str] = ""
  axes: ClassVar[frozenset[str]] = frozenset()
  # The axis its own method splits an image over — patch (the row and sequence methods), tensor, stage
  # (the pipelines); None: it splits nothing. `axes` may name more: methods it runs inside its own
  # (pipefusion's sequence axes inside each stage). Callers ask this what a strategy is, not `axes`.
  method_axis: ClassVar[str | None] = None
  # Pipeline methods whose stages each embed their own step's conditioning: the conditioning
  # embeddings' params go on every stage, and the run traces what crosses each cut (`run.layout`).
  stages_make_conditioning: ClassVar[bool] = False
  families: ClassVar[frozenset[type]] = MODEL_FAMILIES  # the config classes of the models it runs

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if not cls.name:
      return  # an abstract family (e.g. the row-patch strategies' common base)
    if cls.name in _REGISTRY:
      raise ValueError(f"two strategies are named {cls.name!r}: {_REGISTRY[cls.name].__qualname__} and "
                       f"{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    setattr(Strategy, cls.name, staticmethod(cls))  # Strategy.<name>(…) is the class itself

  @classmethod
  def from_name(cls, name: str, **options) -> Strategy:
    """The strategy registered as `name`, built with `options` (its dataclass fields)."""
    unknown = set(options) - set(option_names(name))
    if unknown:
      raise ValueError(f"strategy {name!r} takes no option {', '.join(sorted(unknown))}; its options: "
                       f"{', '.join(option_names(name)) or 'none'}.")
    return _REGISTRY[name](**options)

  # -------------------------------------------------------------------------- what subclasses define

  def phases(self, num_steps: int, sizes: Mapping[str, int], *, simulated: bool = False) -> list[Phase]:
    """The phases of a `num_steps` run on a mesh of `sizes`.

    `simulated`: contexts whose collectives are local stand-ins of the same shapes, so that one
    device runs one device's program of a mesh of `sizes` (sharding/contexts/simulated.py).
    """
    raise NotImplementedError

  def expected_traffic(self, config, height: int, width: int, sizes: Mapping[str, int], batch: int,
                       activation_bytes: int) -> dict[str, int]:
    """Analytic bytes one interior device receives per step of the last phase, by kind.

    `batch` is the batch one device's model call runs (the guidance pair included).
    """
    return {}

  def collectives_per_step(self, config, kinds, sizes: Mapping[str, int]) -> int:
    """Collectives one device runs per step for the traffic `kinds` (keys of `expected_traffic`)."""
    return analytic.collectives_per_step(config, kinds, sizes[PATCH])

  def overlapped_kinds(self) -> frozenset[str]:
    """Traffic kinds of the last phase whose results only the next step consumes (overlappable)."""
    return frozenset()

  def stale_bytes(self, config, height: int, width: int, sizes: Mapping[str, int], batch: int,
                  activation_bytes: int, text_tokens: int = 0) -> dict[str, int]:
    """Analytic bytes of stale state one device carries between steps, by kind (`text_tokens`: the text
    states' tokens, for a strategy that keeps something of the text)."""
    return {}

  def options(self) -> str:
    """Its options in words ('' when it has none)."""
    return ""

  def image_splits(self, num_devices: int) -> list[dict[str, int]]:
    """The ways it splits one image over `num_devices` devices, as {axis: size} of its `axes`.

    One way for a strategy of one axis (all devices on it; `tensor`, when it only composes with the
    method's own axis, is not one of its splits); strategies of several axes list theirs.
    """
    own = self.axes - {TENSOR} or self.axes
    if not own:
      return [{}] if num_devices == 1 else []
    if len(own) > 1:
      raise NotImplementedError(f"{type(self).__name__} splits over {sorted(own)}: it lists its splits")
    return [{next(iter(own)): num_devices}]

  # -------------------------------------------------------------------------- shared behaviour

  @classmethod
  def supports(cls, config) -> bool:
    """Whether it runs the model of `config` (a UNetConfig, DiTConfig, PixArtConfig)."""
    return type(config) in cls.families

  def validate(self, config, height: int, width: int, sizes: Mapping[str, int]) -> None:
    """Raises ValueError, naming the fix, when the model, latent size or mesh do not fit."""
    if not self.supports(config):
      runs = [name for name, cls in _REGISTRY.items() if type(config) in cls.families]
      raise ValueError(f"strategy {self.name!r} does not run a {type(config).__name__} model (it runs "
                       f"{', '.join(sorted(c.__name__ for c in self.families))}); strategies that do: "
                       f"{', '.join(runs)}.")
    config.check_latent_size(height, width)  # first what one device needs
    for axis in MESH_AXES:
      if axis in (DATA, CFG) or axis in self.axes or sizes.get(axis, 1) == 1:
        continue
      users = [name for name, cls in _REGISTRY.items() if axis in cls.axes]
      raise ValueError(
          f"strategy {self.name!r} does not split an image over the {axis!r} axis, but the mesh has "
          f"{axis}={sizes[axis]}: use a mesh with {axis}=1, or a strategy that uses it "
          f"({', '.join(users) or 'none yet'}).")
    if TENSOR in self.axes and sizes.get(TENSOR, 1) > 1:
      check_tensor_degree(config, sizes[TENSOR])

  def steady_phase(self, sizes: Mapping[str, int], *, simulated: bool = False) -> Phase:
    """The phase a run settles in once any warm-up is over: what each step of a long run costs.

    The last phase of the longest run there can be, which every warm-up ends before; its `start`
    is how many steps a run takes to reach it (`bench simulate` times it, accounting reads it).
    """
    return self.phases(_LONGEST_RUN, sizes, simulated=simulated)[-1]

  def latent_spec(self) -> P:
    """How the (B, H, W, C) latents are laid out on the mesh during the run."""
    return P(DATA, PATCH)

  def param_rules(self) -> AxisRules:
    """Which mesh axis splits each logical param axis (sharding/partitioning.py): Megatron's table when the
    strategy composes with tensor parallelism (a `tensor` axis of size 1 splits nothing), else replicated."""
    return AxisRules.tensor() if TENSOR in self.axes else AxisRules.replicated()

  def stage_of_segment(self, config, height: int, width: int, sizes: Mapping[str, int]) -> tuple[int, ...] | None:
    """Pipeline methods: the `stage` index running each of the model's segments, whose params are
    placed there alone (sharding/stage_params.py); every phase then brings its `step`. None (the
    default): params placed by `param_rules`."""
    return None

  def stage_of_device(self, sizes: Mapping[str, int]) -> tuple[int, ...] | None:
    """Pipeline methods: the stage each device along `stage` runs, whose params it holds. None (the
    default): device s runs stage s."""
    return None

  def detail(self, config, height: int, width: int, sizes: Mapping[str, int]) -> str:
    """What the strategy makes of this model, size and mesh, in words (e.g. a pipeline's cuts); '' by default."""
    return ""

  def summary(self) -> str:
    options = self.options()
    return f"{self.name} ({options})" if options else self.name


def option_names(name: str) -> tuple[str, ...]:
  """The options (dataclass fields) strategy `name` takes."""
  return tuple(field.name for field in dataclasses.fields(strategy_class(name)))


def with_shared_options(name: str, options: Mapping[str, Any]) -> Strategy:
  """Strategy `name` built with those of `options` it takes (a run's options shared by several strategies)."""
  return Strategy.from_name(name, **{k: v for k, v in options.items() if k in option_names(name)})


def strategy_names() -> tuple[str, ...]:
  """Every registered strategy, in registration order."""
  return tuple(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(_REGISTRY)}.")
  return _REGISTRY[name]
