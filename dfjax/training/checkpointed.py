"""The resumable step loop every `dfjax train` run shares: orbax checkpoints, loss curve, signals.

`run_steps` drives a jitted step function from a fresh (or the latest checkpointed) state to the
run's last step, saving {state, history} every `save_every` steps. Step s trains on the fresh
labelled batch `dfjax.data.batch((seed, s), batch)`, so a resumed run sees the same data as an
uninterrupted one. It knows nothing of what is trained: the caller passes how to build the state
and one step. `run_record` is what every run's training.json holds. Used by the diffusion models'
`train` (loop.py) and the shapes classifier's (dfjax/eval/train_classifier.py).

Run folder:
  train_config.json   the run's settings; resuming checks they still match
  checkpoints/        orbax CheckpointManager; Ctrl-C or SIGTERM lets the checkpoint being written
                      finish first, and what a `kill -9` cut short is removed by the next run
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from convert.atomic import signals_deferred
from dfjax import data

CHECKPOINTS = "checkpoints"
TRAIN_CONFIG = "train_config.json"


class RunSettings(Protocol):
  """What `run_steps` reads of a run's settings dataclass (TrainConfig, ClassifierTrainConfig)."""

  out: str
  steps: int
  batch: int
  seed: int
  save_every: int
  log_every: int

  def static(self) -> RunSettings: ...

  def resumable_fields(self) -> dict[str, Any]: ...


class RunFields:
  """What every run-settings dataclass (with `out`, `export`, `steps`, `batch`, `lr`, `warmup_steps`,
  `save_every`, `log_every`) does alike; a mixin of TrainConfig and ClassifierTrainConfig."""

  def check_run_fields(self, *counts: str) -> None:
    """Raises ValueError unless the step counts, the batch and `counts` are positive ints and lr > 0."""
    for name in ("steps", "batch", "save_every", "log_every", *counts):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if not self.lr > 0 or self.warmup_steps < 0:
      raise ValueError(f"need lr > 0 and warmup_steps >= 0; got lr={self.lr}, "
                       f"warmup_steps={self.warmup_steps}")

  def static(self):
    """The settings that shape the compiled step (paths and the checkpoint and logging intervals
    blanked): its jit cache key, so runs that differ only in those share the program."""
    return dataclasses.replace(self, out="", export=None, save_every=1, log_every=1)

  def resumable_fields(self) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoints (all but paths)."""
    return dataclasses.asdict(dataclasses.replace(self, out="", export=None))


def run_steps(cfg: RunSettings, *, init_state: Callable[..., Any], train_step: Callable[..., tuple[Any, jax.Array]],
              resume: bool, stop_at: int | None, jitted_init: Callable[..., Any] | None = None,
              schedule: Callable[[int], Any] | None = None, progress: bool = True, desc: str = "train",
              state_shardings: Any = None) -> tuple[Any, dict] | None:
  """Runs steps [latest checkpoint, cfg.steps) and returns (final state, history).

  Args:
    cfg: the run's settings (a dataclass: written to train_config.json).
    init_state: (seed, *, cfg) → the fresh state, traceable (its `jax.eval_shape` is what a
      checkpoint restores into); jitted_init: the compiled version to run (default: jax.jit of it).
    train_step: (state, images, labels, *, cfg) → (next state, loss); the state may be donated.
      Both get `cfg.static()`.
    resume: continue from the latest checkpoint in `cfg.out` (fresh when there is none).
    stop_at: checkpoint and return None after this step (finish later with `resume`).
    schedule: learning rate at a step, shown beside the loss.
    progress, desc: the progress bar.
    state_shardings: where a restored state goes (a pytree of shardings like the state's; default one
      device): a pipelined run restores each stage's rows onto that stage's devices.
  Returns:
    None when stopped early; else the state and the history {"step", "loss" (mean over each
    logging interval), "seconds" (wall time of every session of the run)}.
  Raises:
    ValueError: `cfg.out` holds checkpoints and `resume` is False, or a run with other settings.
  """
  import orbax.checkpoint as ocp
  from tqdm.auto import tqdm

  began = time.perf_counter()
  static = cfg.static()
  out = Path(cfg.out).absolute()
  _check_out(out, cfg, resume)
  out.mkdir(parents=True, exist_ok=True)
  (out / TRAIN_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1, create=True,
                                         cleanup_tmp_directories=True)
  with _sigterm_unwinds(), ocp.CheckpointManager(out / CHECKPOINTS, options=options) as manager:
    start = manager.latest_step() or 0
    if start:
      shapes = jax.eval_shape(functools.partial(init_state, cfg=static), jnp.int32(0))
      if state_shardings is None:
        state_shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                              state_shardings)
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
      state, history = restored["state"], restored["history"]
    else:
      init = jitted_init or jax.jit(init_state, static_argnames="cfg")
      state = init(jnp.int32(cfg.seed), cfg=static)
      if state_shardings is None:  # committed to the device a restored state lands on: one compiled step for both
        state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
      history = {"step": [], "loss": [], "pending": [], "seconds": 0.0}

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=desc, unit="step",
               dynamic_ncols=True)
    # Losses of the logging interval under way (a checkpoint keeps them, as float64).
    losses, seconds_before = list(history.pop("pending", [])), float(history["seconds"])
    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for index in range(start, stop):
      images, labels = data.batch((cfg.seed, index), cfg.batch)
      state, loss = train_step(state, jnp.asarray(images), jnp.asarray(labels), cfg=static)
      losses.append(loss)
      done = index + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        mean = float(np.mean(_floats(losses)))
        losses = []
        history["step"].append(done)
        history["loss"].append(mean)
        shown = {"loss": f"{mean:.4f}"} | ({"lr": f"{float(schedule(done)):.1e}"} if schedule else {})
        bar.set_postfix(shown)
      bar.update(1)
      if done % cfg.save_every == 0 or done == stop:
        losses = _floats(losses)
        # Copies: orbax writes the JSON in a background thread, while this loop appends to these lists.
        saved = {"step": list(history["step"]), "loss": list(history["loss"]), "pending": list(losses),
                 "seconds": seconds_before + time.perf_counter() - began}
        with signals_deferred(f"finishing the checkpoint of step {done}, then stopping (continue "
                              "with --resume)"):
          manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     history=ocp.args.JsonSave(saved)))
        history["seconds"] = saved["seconds"]
    bar.close()
    manager.wait_until_finished()
  return None if stop < cfg.steps else (state, history)


def run_record(cfg: RunSettings, history: dict, command: str | None) -> dict[str, Any]:
  """What every run's training.json says: command, settings, data, loss, wall time, machine.

  `command` defaults to this process's argv.
  """
  return {
      "command": command if command is not None else shlex.join(["dfjax", *sys.argv[1:]]),
      "config": dataclasses.asdict(cfg),
      "steps": cfg.steps,
      "images_seen": cfg.steps * cfg.batch,
      "final_loss": history["loss"][-1] if history["loss"] else None,
      "wall_seconds": round(float(history["seconds"]), 1),
      "machine": machine_description(),
      "data": {"module": "dfjax.data", "image_size": data.IMAGE_SIZE, "class_names": list(data.class_names)},
  }


def machine_description() -> dict[str, Any]:
  """Where the run happened: CPU model and cores, jax devices and versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  device = jax.devices()[0]
  return {"cpu": cpu, "cpu_cores": os.cpu_count(), "platform": device.platform,
          "device_kind": device.device_kind, "jax": jax.__version__, "python": platform.python_version()}


def loss_rows(history: dict, schedule: Callable[[int], Any]) -> list[tuple[int, float, float]]:
  """(step, mean loss, learning rate) of every logging interval: loss.csv's rows."""
  return [(s, l, float(schedule(s))) for s, l in zip(history["step"], history["loss"])]


@contextlib.contextmanager
def _sigterm_unwinds():
  """SIGTERM raises SystemExit(143) instead of ending the process at once, so the checkpoint
  manager's `with` waits for its background writes as it does on Ctrl-C (a handler someone else
  installed is kept)."""
  if threading.current_thread() is not threading.main_thread() or \
     signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
    yield
    return

  def unwind(signum, frame):
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, unwind)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _floats(losses: list) -> list[float]:
  """Per-step losses (device scalars or floats) as Python floats."""
  return [float(x) for x in jax.device_get(losses)]


def _check_out(out: Path, cfg: RunSettings, resume: bool) -> None:
  """Refuses to mix runs: checkpoints of another run, or any checkpoints without `resume`."""
  has_checkpoints = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir())
  if has_checkpoints and not resume:
    raise ValueError(f"{out} already holds training checkpoints: pass --resume to continue that "
                     "run, or choose another --out")
  if has_checkpoints and (out / TRAIN_CONFIG).is_file():
    try:
      before = type(cfg)(**json.loads((out / TRAIN_CONFIG).read_text())).resumable_fields()
    except TypeError as e:  # fields of another kind of run
      raise ValueError(f"cannot resume {out}: it holds another kind of training run ({e}); choose "
                       "another --out") from e
    now = cfg.resumable_fields()
    changed = {k: (before[k], now[k]) for k in now if before[k] != now[k]}
    if changed:
      raise ValueError(f"cannot resume {out}: its run had different settings "
                       + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
                       + "; use the original flags or another --out")
