"""Analytic communication volume and stale-buffer size of patch parallelism for a UNet config.

Derived from the architecture alone (diffusers' UNet2DConditionModel block layout), so that the
figures read from a compiled program (sharding/comm.py) can be checked against it. Per device
and per step, for one patch of `num_patches` row patches, interior device (edge devices receive
only one halo side):
  halo     every k×k conv (k > 1) receives k//2 rows from each neighbour: 2·(k//2)·W·C values;
  kv       every self-attention receives the K and V of the other patches: 2·(n−1)·T_patch·C;
  moments  every GroupNorm receives the (E[x], E[x²]) of the other patches: (n−1)·G·2 fp32 values.
The displaced strategy keeps one step's exchanges per device as its stale buffers: the halos,
the full-image K/V (2·n·T_patch·C per layer) and the n devices' moments.
"""

import dataclasses

from models.config import UNetConfig

MOMENT_BYTES = 4  # GroupNorm statistics stay fp32


@dataclasses.dataclass(frozen=True)
class Site:
  """One layer that exchanges data: its kind, resolution level and channel count."""

  kind: str      # "halo", "kv" or "moments"
  level: int     # resolution level: rows and columns are divided by 2**level
  channels: int
  rows: int = 0  # halo rows per side (convs)


def exchange_sites(config: UNetConfig) -> list[Site]:
  """Every layer of the UNet that needs other patches' data, in no particular order."""
  groups = config.norm_num_groups
  sites = [Site("halo", 0, config.in_channels, config.conv_in_kernel // 2)]

  def resnet(level, c_in, c_out):
    return [Site("moments", level, groups), Site("halo", level, c_in, 1),
            Site("moments", level, groups), Site("halo", level, c_out, 1)]

  def transformer(level, channels, depth):
    return [Site("moments", level, groups)] + [Site("kv", level, channels)] * depth

  channels = config.block_out_channels
  for level, block in enumerate(config.down_block_types):
    c_in = channels[max(level - 1, 0)]
    depths = config.down_transformer_layers(level)  # one per resnet
    for j in range(config.layers_per_block[level]):
      sites += resnet(level, c_in if j == 0 else channels[level], channels[level])
      if block == "CrossAttnDownBlock2D":
        sites += transformer(level, channels[level], depths[j])
    if level < config.num_levels - 1:
      sites.append(Site("halo", level, channels[level], 1))  # stride-2 downsample conv

  last = config.num_levels - 1
  sites += resnet(last, channels[-1], channels[-1])
  sites += transformer(last, channels[-1], config.mid_transformer_layers)
  sites += resnet(last, channels[-1], channels[-1])

  reversed_channels = channels[::-1]
  prev = channels[-1]
  for index, block in enumerate(config.up_block_types):
    level = last - index
    out, skip_in = reversed_channels[index], reversed_channels[min(index + 1, last)]
    depths = config.up_transformer_layers(index)  # one per resnet
    num_resnets = config.layers_per_block[level] + 1
    for j in range(num_resnets):
      skip = skip_in if j == num_resnets - 1 else out
      sites += resnet(level, (prev if j == 0 else out) + skip, out)
      if block == "CrossAttnUpBlock2D":
        sites += transformer(level, out, depths[j])
    if index < last:
      sites.append(Site("halo", level - 1, out, 1))  # conv after nearest upsampling
    prev = out

  sites += [Site("moments", 0, groups), Site("halo", 0, channels[0], config.conv_out_kernel // 2)]
  return sites


def _values(site: Site, height: int, width: int, num_patches: int, stored: bool) -> int:
  """Values one device receives (stored=False) or keeps as stale (stored=True) for a site, per sample."""
  rows, cols = height >> site.level, width >> site.level
  patch_tokens = rows // num_patches * cols
  match site.kind:
    case "halo":
      return 2 * site.rows * cols * site.channels
    case "kv":
      return 2 * (num_patches if stored else num_patches - 1) * patch_tokens * site.channels
    case "moments":
      return (num_patches if stored else num_patches - 1) * site.channels * 2
    case _:
      raise ValueError(f"unknown site kind {site.kind!r}; valid: halo, kv, moments")


def bytes_per_step(config: UNetConfig, height: int, width: int, num_patches: int, batch: int,
                   activation_bytes: int) -> dict[str, int]:
  """Bytes one interior device receives per synchronous step, by kind, for a local batch."""
  return _total(config, height, width, num_patches, batch, activation_bytes, stored=False)


def stale_bytes(config: UNetConfig, height: int, width: int, num_patches: int, batch: int,
                activation_bytes: int, stale_moments: bool = True) -> dict[str, int]:
  """Bytes of stale buffers one device keeps for the displaced strategy, by kind."""
  totals = _total(config, height, width, num_patches, batch, activation_bytes, stored=True)
  if not stale_moments:
    totals.pop("moments")
  return totals


def _total(config, height, width, num_patches, batch, activation_bytes, stored) -> dict[str, int]:
  totals = {"halo": 0, "kv": 0, "moments": 0}
  for site in exchange_sites(config):
    width_bytes = MOMENT_BYTES if site.kind == "moments" else activation_bytes
    totals[site.kind] += batch * width_bytes * _values(site, height, width, num_patches, stored)
  return totals
