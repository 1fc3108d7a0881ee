"""The parallel-context protocol: how the few layers that need other devices' data get it.

Model code never names a mesh axis. The layers that need data beyond their own rows ask the
context passed to the model at call time:
  conv_halo(x, rows, key)      a k×k conv's `rows` = k//2 neighbour rows above and below;
  input_halo(x, rows, key)     the same for a conv on the model's input, always this step's rows;
  norm_moments(m, key)         GroupNorm's image-wide E[x], E[x²] from this device's;
  norm_group_moments(m, parts, key)  a group's moments from those of its `parts` channel parts,
                               when a device holds only some of a group's channels (tensor parallel);
  reduce_partial_sums(y, key)  a row-parallel layer's output from this device's partial sum, when
                               the width it reads is split over devices (tensor parallelism);
  attend(q, k, v, key)         self-attention over every token of the image (the context gathers
                               K/V, or later runs Ulysses or ring attention behind the same call);
  cross_kv(context, project, key)  cross-attention's K/V of the text, `project(context)`, or the
                               K/V kept from an earlier step of the run (the text does not change);
  token_extent(rows)           which global rows this device holds (DiT positional embeddings).
This base class is the single-device context: the whole image is local, so every request is
answered from local data. `sharding/contexts/` implements the same requests with collectives,
stale values or nothing.

Every request carries `key`, the calling layer's dotted path in the module tree
("down_blocks.0.resnets.1.conv1"): it names the layer's slot in the stale state of displaced
methods. A request returns `(answer, sent)`: `sent` is what the request exchanged this step for
the next one (None when nothing is carried). The layer hands it to `keep_for_next_step`, which
records it with NNX's own `sow`, and the caller collects every layer's `sent` with
`call_recording`. So exchanged values leave the model call as data, never through a mutated
Python container, and the model runs unchanged under `nnx.remat`, `nnx.scan` and `jax.checkpoint`.

Shape letters: B batch, H rows, W columns, C channels, T query tokens, S key tokens, N heads,
D head width, G groups (or group parts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Sent = Any  # a pytree of arrays: what one request exchanged for the next step


class SentForNextStep(nnx.Variable):
  """A layer's exchanged values of this step, sown for the next step's stale state."""


def _only_once(previous: Sent | None, sent: Sent) -> Sent:
  if previous is not None:
    raise ValueError("a layer exchanged twice in one model call: every call of a layer that asks the "
                     "parallel context needs its own layer (and key).")
  return sent


def keep_for_next_step(layer: nnx.Module, sent: Sent | None) -> None:
  """Records what `layer`'s request sent, for `call_recording` to return (nothing when None)."""
  if sent is not None:
    layer.sow(SentForNextStep, "sent", sent, reduce_fn=_only_once, init_fn=lambda: None)


def call_recording(model: nnx.Module, *args, **kwargs) -> tuple[Any, dict[str, Sent]]:
  """`model(*args, **kwargs)` and {layer key: what it sent for the next step}."""
  out, state = nnx.capture(model, SentForNextStep)(*args, **kwargs)
  sent = {".".join(str(p) for p in path[:-1]): variable.get_value() for path, variable in nnx.to_flat_state(state)}
  return out, sent


class ParallelContext:
  """Single device: the layer's input already is the whole image. Requests return (answer, None)."""

  def conv_halo(self, x_bhwc: jax.Array, rows: int, key: str) -> tuple[jax.Array, Sent | None]:
    """x with `rows` rows above and below: the neighbours' rows, zeros at the image edges.

    A k×k conv (k = 2·rows + 1, any stride) run with VALID row padding on the answer gives the
    rows this device owns of the full-image conv with `rows` zero padding.
    """
    del key
    return jnp.pad(x_bhwc, ((0, 0), (rows, rows), (0, 0), (0, 0))), None  # B, H+2r, W, C

  def input_halo(self, x_bhwc: jax.Array, rows: int, key: str) -> tuple[jax.Array, Sent | None]:
    """`conv_halo` for a conv that reads the model's input (the latent), answered with this step's rows.

    The input is small (4 channels for SD latents: about 2 KiB per neighbour at SDXL 1024²) and
    known exactly on every device at the start of the step, so even displaced contexts exchange it
    synchronously: DistriFusion's authors' code gives the first conv the current latent too (there
    every device holds the whole latent). Nothing is carried to the next step.
    """
    return self.conv_halo(x_bhwc, rows, key)

  def norm_moments(self, moments_bg2: jax.Array, key: str) -> tuple[jax.Array, Sent | None]:
    """Image-wide GroupNorm moments from this device's: [..., 0] = E[x], [..., 1] = E[x²], fp32."""
    del key
    return moments_bg2, None

  def norm_group_moments(self, moments_bg2: jax.Array, parts: int, key: str) -> tuple[jax.Array, Sent | None]:
    """Each channel part's moments → its group's, where every `parts` consecutive parts form a group.

    The parts have equal sizes, so a group's moments are the mean of its parts'. Here every part
    is local; a tensor-parallel context first gathers the parts that other devices hold.
    """
    del key
    return merge_group_parts(moments_bg2, parts), None  # B, G, 2

  def reduce_partial_sums(self, y: jax.Array, key: str) -> tuple[jax.Array, Sent | None]:
    """The output of a layer whose input width is split over devices, from this device's partial sum.

    One device holds the whole width, so its product already is the sum.
    """
    del key
    return y, None

  def attend(self, q_btnd: jax.Array, k_btnd: jax.Array, v_btnd: jax.Array,
             key: str) -> tuple[jax.Array, Sent | None]:
    """Self-attention of this device's queries over every token of the image, (B, T, N, D).

    Tokens are row-major; the keys and values given are this device's tokens.
    """
    del key
    return jax.nn.dot_product_attention(q_btnd, k_btnd, v_btnd), None  # B, T, N, D

  def cross_kv(self, context_bse: jax.Array, project, key: str) -> tuple[tuple[jax.Array, jax.Array], Sent | None]:
    """Cross-attention's keys and values of the conditioning tokens (the text): `project(context_bse)`,
    (B, S, N, D) each.

    The text is the same at every step of a run, so a context may answer with the K/V an earlier call
    of the run sent (PipeFusion computes them once per run); here they are computed.
    """
    del key
    return project(context_bse), None

  def token_extent(self, local_rows: int) -> tuple[jax.Array | int, int]:
    """(global index of this device's first row, rows of the whole image) for `local_rows` here."""
    return 0, local_rows


def merge_group_parts(moments_bg2: jax.Array, parts: int) -> jax.Array:
  """(B, G, 2) moments of equal channel parts, `parts` consecutive ones per group → each part's group's."""
  b, g, _ = moments_bg2.shape
  groups_bg2 = moments_bg2.reshape(b, g // parts, parts, 2).mean(axis=2)  # B, G/parts, 2
  return jnp.repeat(groups_bg2, parts, axis=1)  # B, G, 2


SINGLE_DEVICE = ParallelContext()
