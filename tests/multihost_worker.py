"""One process of a multi-process run (started by test_multihost.py, not collected by pytest).

Usage: python multihost_worker.py OUT.npz  with DFJAX_COORDINATOR / DFJAX_NUM_PROCESSES /
DFJAX_PROCESS_ID set; process 0 writes the `RUNS`' latents under their names. Importing it has
no side effects: the test computes the one-device reference (`single_latents`) in its own process.
"""

import os
import sys

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dfjax.sampling import Conditioning, sample
from models.config import UNetConfig
from models.unet import UNet2DConditionModel
from sharding.distributed import ProcessGroup, initialize
from sharding.mesh import make_mesh
from sharding.strategies import Strategy

UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
    "cross_attention_dim": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


def _sample(mesh=None, strategy: Strategy | None = None) -> jax.Array:
  """A 4-step run of a tiny UNet on the same inputs in every process (mesh None: on one device)."""
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(UNET), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((1, 32, 8, 4), np.float32)
  cond, uncond = (Conditioning(rng.standard_normal((1, 5, 32), np.float32)) for _ in range(2))
  jax.config.update("jax_default_matmul_precision", "highest")
  return sample(model, noise, cond, uncond=uncond, num_steps=4, mesh=mesh, strategy=strategy,
                scheduler_config={"clip_sample": False})


def single_latents() -> np.ndarray:
  """The reference every run equals (`exact` is `single` to float rounding): one device, one process."""
  return np.asarray(_sample())


def _latents(mesh, strategy: Strategy) -> np.ndarray:
  """A run over `mesh` (all 8 devices, whichever processes hold them), gathered to every process."""
  return multihost_utils.process_allgather(_sample(mesh, strategy), tiled=True)


def exact_latents() -> np.ndarray:
  """exact over cfg=2 × patch=4: the guidance halves split between the processes."""
  return _latents(make_mesh(1, 2, 4), Strategy.exact())


def _patch_neighbours_apart() -> list:
  """The 8 devices ordered so that a cfg=2 × patch=2 × tensor=2 mesh puts each pair of patch neighbours
  in different processes (the halves of the device list stand for the processes in one process)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  first, second = devices[:4], devices[4:]
  return [*first[:2], *second[:2], *first[2:], *second[2:]]  # mesh order: cfg, patch, tensor (outer first)


def hybrid_latents() -> np.ndarray:
  """exact over cfg=2 × patch=2 × tensor=2, the halos, K/V and moments crossing the process boundary."""
  return _latents(make_mesh(1, 2, 2, tensor=2, devices=_patch_neighbours_apart()), Strategy.exact())


RUNS = {"exact": exact_latents, "hybrid": hybrid_latents}


if __name__ == "__main__":
  initialize(ProcessGroup.from_env(), timeout_s=int(os.environ.get("DFJAX_TIMEOUT_S", "60")))
  latents = {name: run() for name, run in RUNS.items()}
  if jax.process_index() == 0:
    np.savez(sys.argv[1], **latents)
