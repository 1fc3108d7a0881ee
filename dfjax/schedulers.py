"""Samplers as pure JAX functions whose state fits a `lax.scan` carry: DDIM, Euler, DPM-Solver++(2M).

Maths conventions (those of diffusers):
  betas β_t, t = 0 … T-1 (T = num_train_timesteps);  ᾱ_t = ∏_{s≤t} (1 - β_s)   (alphas_cumprod)
  VP sample        x_t = α_t x0 + σ_t ε   with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t)   (DDIM, DPM)
  VE sample (Euler) x = x0 + s ε           with s = sqrt((1 - ᾱ_t) / ᾱ_t) = σ_t / α_t ("sigma")
  model outputs:   epsilon → ε,  v_prediction → v = α_t ε - σ_t x0,  sample → x0
  DPM half log-SNR λ_t = log(α_t / σ_t) = -log s.

Everything that depends only on the step index is computed once on the host in float64 (a table of
per-step coefficients, float32) so that `Scheduler.step` is a few fused elementwise ops that index
the table with a traced step index: the compiled program does not grow with the number of steps.
The timestep spacings, the first/last-order steps of DPM and DDIM's prev-timestep rule are
resolved into that table; no Python branching on the step index happens at trace time.

Names: S = number of sampling steps, i = step index (0 … S-1, noisiest first).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# diffusers keys we accept only at one setting (the value(s) we implement). None counts as off.
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
  "thresholding": (False,),
  "rescale_betas_zero_snr": (False,),
  "use_karras_sigmas": (False, None),
  "use_exponential_sigmas": (False, None),
  "use_beta_sigmas": (False, None),
  "use_lu_lambdas": (False,),
  "use_flow_sigmas": (False,),
  "use_dynamic_shifting": (False,),
  "interpolation_type": ("linear",),
  "timestep_type": ("discrete",),
  "algorithm_type": ("dpmsolver++",),
  "solver_order": (2,),
  "solver_type": ("midpoint",),
  "variance_type": (None,),
  "lambda_min_clipped": (-math.inf,),
}
# diffusers keys that only matter for settings rejected above, or for other schedulers.
_IGNORED_KEYS = frozenset(
  {
    "_class_name",
    "_diffusers_version",
    "_use_default_values",
    "skip_prk_steps",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "sigma_min",
    "sigma_max",
    "flow_shift",
    "time_shift_type",
  }
)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """Noise schedule and sampler options, named as in diffusers' `scheduler_config.json`.

  Defaults are DDIMScheduler's, except `timestep_spacing`: None (a config that does not name
  one, such as Stable Diffusion 1.x's) takes the scheduler's own diffusers default when the
  scheduler is made: "leading" for DDIM, "linspace" for Euler and DPM-Solver++. `clip_sample` and
  `set_alpha_to_one` are read only by DDIM; `lower_order_final`, `euler_at_final` only by DPM;
  `final_sigmas_type` only by Euler and DPM.
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"
  timestep_spacing: str | None = None
  steps_offset: int = 0
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "zero"

  def __post_init__(self):
    if self.trained_betas is not None:
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
    _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
    _check_choice("timestep_spacing", self.timestep_spacing, (*TIMESTEP_SPACINGS, None))
    _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
    _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
    if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
      raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
    if not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ValueError(
        f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
      )
    betas = self.trained_betas
    if betas is not None and (len(betas) != self.num_train_timesteps or not all(0 < b < 1 for b in betas)):
      raise ValueError(
        f"trained_betas must hold num_train_timesteps={self.num_train_timesteps} values in (0, 1), "
        f"got {len(betas)} values in [{min(betas, default=None)}, {max(betas, default=None)}]"
      )
    if not isinstance(self.steps_offset, int) or not 0 <= self.steps_offset < self.num_train_timesteps:
      raise ValueError(
        f"steps_offset must be an int in [0, {self.num_train_timesteps}), got {self.steps_offset!r}"
      )
    if not self.clip_sample_range > 0:
      raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

  @classmethod
  def from_diffusers_config(cls, d: Mapping[str, Any]) -> SchedulerConfig:
    """Build from a diffusers scheduler config dict (DDIM, Euler discrete, DPM-Solver multistep…).

    Settings we do not implement (Karras sigmas, thresholding, …) raise ValueError; keys that only
    matter to those settings or to other schedulers are ignored; unknown keys give a warning.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in d.items():
      if key in fields:
        kwargs[key] = value
      elif key in _FIXED_KEYS:
        _check_choice(key, value, _FIXED_KEYS[key])
      elif key not in _IGNORED_KEYS:
        unknown.append(key)
    if unknown:
      warnings.warn(f"scheduler config keys ignored by dfjax: {sorted(unknown)}", stacklevel=2)
    return cls(**kwargs)


def _check_choice(key: str, value: Any, supported: tuple[Any, ...]) -> None:
  if value not in supported:
    raise ValueError(f"unsupported {key}={value!r}; supported: {', '.join(map(repr, supported))}")


# ---------------------------------------------------------------------------------------------
# The shared noise schedule and timestep spacing (host, float64).


def train_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """ᾱ_t for the T training timesteps, float64 [T]."""
  n = config.num_train_timesteps
  if config.trained_betas is not None:
    betas = np.asarray(config.trained_betas, np.float64)
  else:
    match config.beta_schedule:
      case "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n)
      case "scaled_linear":  # the latent-diffusion schedule: linear in sqrt(beta)
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
      case "squaredcos_cap_v2":  # GLIDE / improved-DDPM cosine, betas capped at 0.999
        f = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
      case other:
        raise ValueError(f"unsupported beta_schedule={other!r}; supported: {BETA_SCHEDULES}")
  return np.cumprod(1.0 - betas)


def spaced_timesteps(
  config: SchedulerConfig, num_steps: int, *, rounded: bool, skip_final: bool
) -> np.ndarray:
  """The S training timesteps the model sees, noisiest first, float64 [S].

  Args:
    rounded: round "linspace" timesteps to integers (DDIM, DPM) or keep them fractional (Euler).
    skip_final: space S+1 points and drop the last (t≈0) one for "linspace" and "leading" (DPM).
  """
  T = config.num_train_timesteps
  n = num_steps + 1 if skip_final else num_steps  # points to space; [:num_steps] then drops the extra one
  match config.timestep_spacing:
    case "linspace":
      t = np.linspace(0, T - 1, n)[::-1][:num_steps]
      t = t.round() if rounded else t
    case "leading":
      t = (np.arange(n) * (T // n))[::-1][:num_steps] + config.steps_offset
    case "trailing":  # diffusers' np.arange(T, 0, -T/S) has S+1 entries for some S; we keep S
      t = np.round(T - np.arange(num_steps) * (T / num_steps)) - 1
    case other:
      raise ValueError(f"unsupported timestep_spacing={other!r}; supported: {TIMESTEP_SPACINGS}")
  bad = (t < 0) | (t > T - 1)
  bad[1:] |= np.diff(t) >= 0
  if bad.any():
    k = int(np.argmax(bad))  # the first offending step, shown with the one before it
    at = f"step 0 is {t[0]:.0f}" if k == 0 else f"steps {k - 1} and {k} are {t[k - 1]:.0f}, {t[k]:.0f}"
    raise ValueError(
      f"timestep_spacing={config.timestep_spacing!r} with steps_offset={config.steps_offset} and "
      f"num_steps={num_steps} gives timesteps that are not strictly decreasing inside [0, {T - 1}] "
      f"({at}); use fewer steps, another spacing or a smaller steps_offset"
    )
  return t


def _prediction_coefs(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray):
  """(x0_x, x0_m, eps_x, eps_m): x0 = x0_x·x + x0_m·m and ε = eps_x·x + eps_m·m for a VP sample x."""
  one, zero = np.ones_like(alpha), np.zeros_like(alpha)
  match prediction_type:
    case "epsilon":
      return 1 / alpha, -sigma / alpha, zero, one
    case "v_prediction":
      return alpha, -sigma, sigma, alpha
    case "sample":
      return zero, one, 1 / sigma, -alpha / sigma
    case other:
      raise ValueError(f"unsupported prediction_type={other!r}; supported: {PREDICTION_TYPES}")


def prediction_target(prediction_type: str, x0, eps, alpha, sigma):
  """What a model of `prediction_type` regresses for the sample x = alpha·x0 + sigma·eps."""
  match prediction_type:
    case "epsilon":
      return eps
    case "v_prediction":
      return alpha * eps - sigma * x0
    case "sample":
      return x0
    case other:
      raise ValueError(f"unsupported prediction_type={other!r}; supported: {PREDICTION_TYPES}")


# ---------------------------------------------------------------------------------------------
# The schedulers: per-step coefficient tables (host) and the traced step.


class SchedulerKind(enum.Enum):
  DDIM = "ddim"
  EULER = "euler"
  DPMPP_2M = "dpmpp_2m"


_NAMES = {
  "ddim": SchedulerKind.DDIM,
  "DDIMScheduler": SchedulerKind.DDIM,
  "euler": SchedulerKind.EULER,
  "euler_discrete": SchedulerKind.EULER,
  "EulerDiscreteScheduler": SchedulerKind.EULER,
  "dpmpp_2m": SchedulerKind.DPMPP_2M,
  "dpm++_2m": SchedulerKind.DPMPP_2M,
  "DPMSolverMultistepScheduler": SchedulerKind.DPMPP_2M,
}


@dataclasses.dataclass(frozen=True)
class Scheduler:
  """A sampler for a fixed number of steps. Hashable (by kind, config, num_steps), so it can be a
  static argument of `jax.jit`; its tables become constants of the compiled program.

  Attributes:
    timesteps: [S] model timesteps, as diffusers gives them (int64; float32 for Euler).
    init_noise_sigma: the sampling loop starts from unit Gaussian noise times this.

  Use inside a scan (i is the traced step index; the scan may be split, e.g. warm-up steps then the rest):
    def body(carry, i):
        x, state = carry
        out = model(sched.scale_model_input(x, i), sched.model_timestep(i), ...)
        return sched.step(state, out, i, x), None
    (x, _), _ = lax.scan(body, (noise * sched.init_noise_sigma, sched.init_state(noise)), jnp.arange(S))
  """

  kind: SchedulerKind
  config: SchedulerConfig
  num_steps: int
  timesteps: np.ndarray = dataclasses.field(compare=False, repr=False)
  init_noise_sigma: float = dataclasses.field(compare=False)
  columns: tuple[str, ...] = dataclasses.field(compare=False, repr=False)  # names of the table's K columns
  table: np.ndarray = dataclasses.field(compare=False, repr=False)  # float32 [S, K]: per-step coefficients

  def _at(self, i: jax.Array) -> dict[str, jax.Array]:
    row = lax.dynamic_index_in_dim(jnp.asarray(self.table), i, keepdims=False)  # [K]
    return {name: row[k] for k, name in enumerate(self.columns)}

  def model_timestep(self, i: jax.Array) -> jax.Array:
    """The timestep to call the model with at step i (float32 scalar; i may be traced)."""
    return self._at(i)["timestep"]

  def scale_model_input(self, x: jax.Array, i: jax.Array) -> jax.Array:
    """The model's input at step i: x / sqrt(s² + 1) for Euler, x itself otherwise."""
    if self.kind is not SchedulerKind.EULER:
      return x
    return (x.astype(jnp.float32) * self._at(i)["in_scale"]).astype(x.dtype)

  def init_state(self, x: jax.Array) -> dict[str, jax.Array]:
    """The scan-carry state before step 0 (DPM: the previous x0 prediction, float32)."""
    if self.kind is SchedulerKind.DPMPP_2M:
      return {"x0_prev": jnp.zeros_like(x, jnp.float32)}  # zeros_like keeps x's sharding (and shard_map vma)
    return {}

  def step(
    self, state: dict[str, jax.Array], model_output: jax.Array, i: jax.Array, x: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One denoising step from x at step i to the next sample; returns (x_prev, state).

    Elementwise (no cross-element maths), so it runs unchanged on a device's patch of x.
    Computes in float32 and returns x's dtype.
    """
    k = self._at(i)
    x32, m32 = x.astype(jnp.float32), model_output.astype(jnp.float32)
    x0 = k["x0_x"] * x32 + k["x0_m"] * m32
    match self.kind:
      case SchedulerKind.DDIM:  # x_prev = α_prev x0 + σ_prev ε  (eta = 0)
        if self.config.clip_sample:
          r = self.config.clip_sample_range
          x0 = jnp.clip(x0, -r, r)
        eps = k["eps_x"] * x32 + k["eps_m"] * m32
        x_prev = k["alpha_prev"] * x0 + k["sigma_prev"] * eps
      case SchedulerKind.EULER:  # x_prev = x + (x - x0)/s · (s_next - s)
        x_prev = x32 + (x32 - x0) * k["ds_over_s"]
      case SchedulerKind.DPMPP_2M:  # x_prev = a·x + b·x0 + c·(x0 - x0_prev); c = 0 on 1st-order steps
        x_prev = k["a"] * x32 + k["b"] * x0 + k["c"] * (x0 - state["x0_prev"])
        state = {"x0_prev": x0}
      case other:
        raise ValueError(f"unknown scheduler kind {other!r}; valid: {[v.value for v in SchedulerKind]}")
    return x_prev.astype(x.dtype), state


# diffusers' default `timestep_spacing` of each scheduler class.
_DEFAULT_SPACING = {SchedulerKind.DDIM: "leading", SchedulerKind.EULER: "linspace",
                    SchedulerKind.DPMPP_2M: "linspace"}


def make_scheduler(name: str, config: SchedulerConfig, num_steps: int) -> Scheduler:
  """Build the scheduler `name` ("ddim", "euler", "dpmpp_2m" or a diffusers class name) for num_steps steps."""
  if name not in _NAMES:
    raise ValueError(f"unknown scheduler {name!r}; valid names: {sorted(_NAMES)}")
  kind = _NAMES[name]
  T = config.num_train_timesteps
  if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be an int in [1, num_train_timesteps={T}], got {num_steps!r}")
  num_steps = int(num_steps)
  if config.timestep_spacing is None:
    config = dataclasses.replace(config, timestep_spacing=_DEFAULT_SPACING[kind])
  alphas_cumprod = train_alphas_cumprod(config)
  match kind:
    case SchedulerKind.DDIM:
      t, init_sigma, coefs = _ddim_tables(config, num_steps, alphas_cumprod)
    case SchedulerKind.EULER:
      t, init_sigma, coefs = _euler_tables(config, num_steps, alphas_cumprod)
    case SchedulerKind.DPMPP_2M:
      t, init_sigma, coefs = _dpm_tables(config, num_steps, alphas_cumprod)
    case other:
      raise ValueError(f"unknown scheduler kind {other!r}; valid: {[v.value for v in SchedulerKind]}")
  timesteps = t.astype(np.float32 if kind is SchedulerKind.EULER else np.int64)
  columns = ("timestep", *coefs)
  table = np.stack([t, *coefs.values()], axis=1).astype(np.float32)
  return Scheduler(kind, config, num_steps, timesteps, float(init_sigma), columns, table)


def _sigmas(config: SchedulerConfig, t: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
  """VE sigmas s at the timesteps t (linearly interpolated) plus the final sigma, [S+1]."""
  s_train = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
  s_last = s_train[0] if config.final_sigmas_type == "sigma_min" else 0.0
  return np.append(np.interp(t, np.arange(len(s_train)), s_train), s_last)


def _ddim_tables(config, num_steps, alphas_cumprod):
  t = spaced_timesteps(config, num_steps, rounded=True, skip_final=False)
  # diffusers' rule: the previous timestep is t - T//S whatever the spacing.
  prev = t.astype(np.int64) - config.num_train_timesteps // num_steps
  final = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
  a_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)
  a = alphas_cumprod[t.astype(np.int64)]
  x0_x, x0_m, eps_x, eps_m = _prediction_coefs(config.prediction_type, np.sqrt(a), np.sqrt(1 - a))
  coefs = dict(
    x0_x=x0_x, x0_m=x0_m, eps_x=eps_x, eps_m=eps_m, alpha_prev=np.sqrt(a_prev), sigma_prev=np.sqrt(1 - a_prev)
  )
  return t, 1.0, coefs


def _euler_tables(config, num_steps, alphas_cumprod):
  t = spaced_timesteps(config, num_steps, rounded=False, skip_final=False)
  s = _sigmas(config, t, alphas_cumprod)  # [S+1]
  alpha = 1 / np.sqrt(s[:-1] ** 2 + 1)
  x0_x, x0_m, _, _ = _prediction_coefs(config.prediction_type, alpha, s[:-1] * alpha)
  # The Euler sample is VE (x_VP / α): x0 = α·x0_x·x + x0_m·m.
  coefs = dict(in_scale=alpha, x0_x=x0_x * alpha, x0_m=x0_m, ds_over_s=(s[1:] - s[:-1]) / s[:-1])
  init_sigma = s.max() if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(s.max() ** 2 + 1)
  return t, init_sigma, coefs


def _dpm_tables(config, num_steps, alphas_cumprod):
  t = spaced_timesteps(config, num_steps, rounded=True, skip_final=True)
  s = _sigmas(config, t, alphas_cumprod)  # [S+1]
  alpha = 1 / np.sqrt(s**2 + 1)
  sigma = s * alpha
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = -np.log(s)  # λ = log(α/σ); +inf at a final sigma of zero
    h = lam[1:] - lam[:-1]  # [S]
    r = np.concatenate([[np.nan], (lam[1:-1] - lam[:-2]) / h[1:]])  # r0 = h_prev / h, [S]
    b = -alpha[1:] * np.expm1(-h)
    c = 0.5 * b / r  # midpoint: -0.5·α_t·(e^{-h} - 1)·D1 with D1 = (x0 - x0_prev)/r0
  step = np.arange(num_steps)
  final_first_order = (
    config.euler_at_final
    or (config.lower_order_final and num_steps < 15)
    or config.final_sigmas_type == "zero"
  )
  first_order = (step == 0) | ((step == num_steps - 1) & final_first_order)
  x0_x, x0_m, _, _ = _prediction_coefs(config.prediction_type, alpha[:-1], sigma[:-1])
  coefs = dict(x0_x=x0_x, x0_m=x0_m, a=sigma[1:] / sigma[:-1], b=b, c=np.where(first_order, 0.0, c))
  return t, 1.0, coefs
