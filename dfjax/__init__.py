"""dfjax: high-resolution diffusion inference in JAX, one image spread over a device mesh.

  model = dfjax.load_model("ckpt/")
  pipe = dfjax.load_pipeline("sdxl-dfjax/")   # a converted diffusers pipeline: prompt → images
  mesh = dfjax.make_mesh(cfg=2, patch=4)
  latents = dfjax.sample(model, noise, dfjax.Conditioning(text), uncond=dfjax.Conditioning(empty),
                         mesh=mesh, strategy=dfjax.Strategy.displaced(warmup_steps=4))
"""

from dfjax.loading import load_model
from dfjax.pipelines import load_pipeline
from dfjax.sampling import Conditioning, lower_sample, sample, stale_buffer_shapes
from dfjax.schedulers import SchedulerConfig, make_scheduler
from sharding.exchange.groupnorm import GroupNormMode
from sharding.mesh import make_mesh
from sharding.strategies import Strategy

__all__ = ["Conditioning", "GroupNormMode", "SchedulerConfig", "Strategy", "load_model", "load_pipeline", "lower_sample",
           "make_mesh", "make_scheduler", "sample", "stale_buffer_shapes"]
