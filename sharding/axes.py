"""The mesh axis names, the one place they are spelled.

Outermost first, as `make_mesh` lays them out:
  DATA    splits the batch;
  CFG     splits the unconditional / conditional halves of classifier-free guidance;
  STAGE   holds consecutive pieces of the network (pipeline and asynchronous methods);
  PATCH   splits the latent's rows, or a DiT's row-major tokens (patch and sequence methods);
  ULYSSES splits each PATCH block's tokens again, for USP (Ulysses × ring): tokens are laid out over
          (PATCH, ULYSSES), all-to-alls run within ULYSSES (neighbouring devices, the fast links),
          K/V blocks rotate over PATCH;
  TENSOR  splits attention heads and feed-forward / conv channels (tensor parallelism).
"""

DATA = "data"
CFG = "cfg"
STAGE = "stage"
PATCH = "patch"
ULYSSES = "ulysses"
TENSOR = "tensor"

MESH_AXES = (DATA, CFG, STAGE, PATCH, ULYSSES, TENSOR)
SEQUENCE = (PATCH, ULYSSES)  # USP splits a latent's rows / a DiT's tokens over both, outer first
