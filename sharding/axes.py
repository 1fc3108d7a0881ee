"""The mesh axis names, the one place they are spelled.

Outermost first, as `make_mesh` lays them out:
  DATA    splits the batch;
  CFG     splits the unconditional / conditional halves of classifier-free guidance;
  STAGE   holds consecutive pieces of the network (pipeline and asynchronous methods);
  PATCH   splits the latent's rows, or a DiT's row-major tokens (patch and sequence methods);
  TENSOR  splits attention heads and feed-forward / conv channels (tensor parallelism).
"""

DATA = "data"
CFG = "cfg"
STAGE = "stage"
PATCH = "patch"
TENSOR = "tensor"

MESH_AXES = (DATA, CFG, STAGE, PATCH, TENSOR)
