"""One process of a multi-process run (started by test_multihost.py, not collected by pytest).

Usage: python multihost_worker.py OUT.npy  with DFJAX_COORDINATOR / DFJAX_NUM_PROCESSES /
DFJAX_PROCESS_ID set. Importing it has no side effects: the test computes the single-process
reference with `exact_latents` in its own 8-device process.
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


def exact_latents() -> np.ndarray:
  """A 4-step exact run over a cfg=2 × patch=4 mesh of all devices, gathered to every process."""
  model = UNet2DConditionModel(UNetConfig.from_diffusers_config(UNET), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)  # the same inputs in every process
  noise = rng.standard_normal((1, 32, 8, 4), np.float32)
  cond, uncond = (Conditioning(rng.standard_normal((1, 5, 32), np.float32)) for _ in range(2))
  mesh = make_mesh(1, 2, 4)  # all 8 devices, whichever processes hold them
  jax.config.update("jax_default_matmul_precision", "highest")
  latents = sample(model, noise, cond, uncond=uncond, num_steps=4, mesh=mesh, strategy=Strategy.exact(),
                   scheduler_config={"clip_sample": False})
  return multihost_utils.process_allgather(latents, tiled=True)


if __name__ == "__main__":
  initialize(ProcessGroup.from_env(), timeout_s=int(os.environ.get("DFJAX_TIMEOUT_S", "60")))
  latents = exact_latents()
  if jax.process_index() == 0:
    np.save(sys.argv[1], latents)
