"""Analytic communication volume and stale-buffer size of patch parallelism for a UNet config.

Derived from the architecture alone: the model's own list of its requests to the parallel
context (every k×k conv's halo, self-attention's K/V and GroupNorm's moments, each at its
resolution; `models.unet.segment_costs`), so that the figures read from a compiled program
(sharding/accounting/comm.py) can be checked against it. Per device and per step, for one patch
of `num_patches` row patches, interior device (edge devices receive only one halo side):
  halo     every k×k conv (k > 1) receives k//2 rows from each neighbour: 2·(k//2)·W·C values;
  input_halo  the same for the conv on the model's input (exchanged fresh in every step, never stale);
  kv       every self-attention receives the K and V of the other patches: 2·(n−1)·T_patch·C;
  moments  every GroupNorm receives the (E[x], E[x²]) of the other patches: (n−1)·G·2 fp32 values.
The displaced strategy keeps one step's exchanges per device as its stale buffers: the halos,
the full-image K/V (2·n·T_patch·C per layer) and the n devices' moments.
"""

from models.config import UNetConfig
from models.layers import Exchange, Workload, total
from models.unet import segment_costs

MOMENT_BYTES = 4  # GroupNorm statistics stay fp32


def exchange_sites(config: UNetConfig, height: int | None = None, width: int | None = None) -> list[Exchange]:
  """Every request of the UNet to the parallel context in one forward of a `height` × `width` latent,
  in call order. Which requests there are does not depend on the size (only their volumes do): by
  default, the smallest latent the UNet takes."""
  height, width = height or config.row_granularity, width or config.row_granularity
  costs = segment_costs(config, Workload(height, width, text_tokens=1))  # the text asks for nothing
  return list(total(costs.values()).exchanges)


def _values(site: Exchange, num_patches: int, stored: bool) -> int:
  """Values one device receives (stored=False) or keeps as stale (stored=True) for a site, per sample."""
  patch_tokens = site.rows // num_patches * site.cols
  match site.kind:
    case "halo":
      return 2 * site.halo_rows * site.cols * site.channels
    case "input_halo":  # exchanged in every step, so never kept as stale state
      return 0 if stored else 2 * site.halo_rows * site.cols * site.channels
    case "kv":
      return 2 * (num_patches if stored else num_patches - 1) * patch_tokens * site.channels
    case "moments":
      return (num_patches if stored else num_patches - 1) * site.channels * 2
    case _:
      raise ValueError(f"unknown site kind {site.kind!r}; valid: halo, input_halo, kv, moments")


def bytes_per_step(config: UNetConfig, height: int, width: int, num_patches: int, batch: int,
                   activation_bytes: int) -> dict[str, int]:
  """Bytes one interior device receives per synchronous step, by kind, for a local batch."""
  return _total(config, height, width, num_patches, batch, activation_bytes, stored=False)


def stale_bytes(config: UNetConfig, height: int, width: int, num_patches: int, batch: int,
                activation_bytes: int, stale_moments: bool = True) -> dict[str, int]:
  """Bytes of stale buffers one device keeps for the displaced strategy, by kind."""
  totals = _total(config, height, width, num_patches, batch, activation_bytes, stored=True)
  totals.pop("input_halo")
  if not stale_moments:
    totals.pop("moments")
  return totals


def _total(config, height, width, num_patches, batch, activation_bytes, stored) -> dict[str, int]:
  totals = {"halo": 0, "input_halo": 0, "kv": 0, "moments": 0}
  for site in exchange_sites(config, height, width):
    width_bytes = MOMENT_BYTES if site.kind == "moments" else activation_bytes
    totals[site.kind] += batch * width_bytes * _values(site, num_patches, stored)
  return totals
