"""Analytic communication volume and stale-buffer size of patch, sequence and tensor parallelism for a model.

Derived from the architecture alone: the model's own list of its requests to the parallel
context (every k×k conv's halo, self-attention's K/V and GroupNorm's moments, each at its
resolution: its segments' costs, `models.build.segment_costs`),
so that the figures read from a compiled program (sharding/accounting/comm.py) can be checked
against it. Per device and per step, for one patch of `num_patches` row patches, interior device
(edge devices receive only one halo side):
  halo     every k×k conv (k > 1) receives k//2 rows from each neighbour: 2·(k//2)·W·C values;
  input_halo  the same for the conv on the model's input (exchanged fresh in every step, never stale);
  kv       every self-attention receives the K and V of the other patches: 2·(n−1)·T_patch·C;
  alltoall Ulysses instead: four all-to-alls per self-attention (q, k, v to head sharding, the
           output back), each receiving (n−1)/n of the local T_patch·C tensor: 4·(n−1)·T_patch·C/n;
  ring     ring attention instead: n−1 K/V block transfers per self-attention: 2·(n−1)·T_patch·C;
  usp      USP over u (Ulysses) × r (ring) = n devices: the four all-to-alls within u,
           4·(u−1)·T_patch·C/u (`alltoall`), then r−1 block transfers of the K/V a device holds
           after them (u·T_patch tokens × C/u channels), 2·(r−1)·T_patch·C (`ring`);
  moments  every GroupNorm receives the (E[x], E[x²]) of the other patches: (n−1)·G·2 fp32 values.
The displaced strategy keeps one step's exchanges per device as its stale buffers: the halos,
the full-image K/V (2·n·T_patch·C per layer) and the n devices' moments.

With t-way tensor parallelism (sharding/contexts/tensor.py) every site of an inner width
(INNER_WIDTHS: the channels of a resnet's conv2 halo and norm2, self-attention's heads) carries
1/t of its channels, and two kinds join, over `tensor`:
  partial_sums   every row-parallel layer all-reduces its output: T_patch·C_out values of payload
                 (what the compiled all-reduce moves; a ring all-reduce sends and receives
                 2·(t−1)/t of it per device, `ring_allreduce_bytes`);
  group_moments  a GroupNorm whose groups straddle devices gathers the other devices' group parts'
                 moments: (t−1)·parts·2 fp32 values.
"""

import math

from models.build import segment_costs
from models.layers import INNER_WIDTHS, Exchange, Workload, total

MOMENT_BYTES = 4  # GroupNorm statistics stay fp32


def exchange_sites(config, height: int | None = None, width: int | None = None) -> list[Exchange]:
  """Every request of the model (UNet, DiT or PixArt) to the parallel context in one forward of a
  `height` × `width` latent, in call order. Which requests there are does not depend on the size
  (only their volumes do): by default, the smallest latent the model takes."""
  height, width = height or config.row_granularity, width or config.row_granularity
  costs = segment_costs(config, Workload(height, width, text_tokens=1))  # the text asks for nothing
  return list(total(costs.values()).exchanges)


ATTENTION_KINDS = ("kv", "alltoall", "ring", "usp")  # self-attention: K/V gathered, Ulysses, ring, both
# Collectives per site by traffic kind (a halo: from above and from below; ring: r−1, see below).
COLLECTIVES = {"halo": 2, "input_halo": 2, "kv": 1, "moments": 1, "alltoall": 4, "partial_sums": 1}


def collectives_per_step(config, kinds, num_patches: int, ulysses: int = 1) -> int:
  """Collectives one device runs per step for the traffic `kinds` (keys of `bytes_per_step`).

  `num_patches` devices split the tokens, `ulysses` of them within each all-to-all group (USP).
  """
  per_site = COLLECTIVES | {"ring": num_patches // ulysses - 1}  # the ring passes r−1 K/V blocks on
  attention_kinds = {"kv", "alltoall", "ring"}
  return sum(per_site[kind] for kind in kinds for site in exchange_sites(config)
             if site.kind == ("kv" if kind in attention_kinds else kind))


def _attention_values(patch_values: int, num_patches: int, stored: bool, attention: str,
                      ulysses: int) -> dict[str, int]:
  """{kind: values} one device receives (or keeps as stale) for one self-attention of `patch_values`
  = T_patch·C values per token block, per sample."""
  n, u = num_patches, ulysses
  match attention:
    case "kv":  # gathered, and all n blocks kept when stale
      return {"kv": 2 * (n if stored else n - 1) * patch_values}
    case "ring":  # the other patches' K and V, block by block
      return {"ring": 2 * (n - 1) * patch_values}
    case "alltoall":  # q, k, v and the output; 1/n of each stays on the device
      return {"alltoall": 4 * (n - 1) * patch_values // n}
    case "usp":  # the same within u, then the ring over r = n/u blocks of u·T_patch tokens, C/u channels
      return {"alltoall": 4 * (u - 1) * patch_values // u, "ring": 2 * (n // u - 1) * patch_values}
  raise ValueError(f"unknown attention exchange {attention!r}; valid: {', '.join(ATTENTION_KINDS)}")


def _channels(site: Exchange, tensor: int) -> int:
  """The site's channels on one device: 1/t of an inner width."""
  return site.channels // tensor if site.axis in INNER_WIDTHS else site.channels


def _local_group_channels(site: Exchange, tensor: int) -> tuple[int, int]:
  """A GroupNorm site's (channels on one device, channels per group part there)."""
  local = site.channels * site.group_size // (tensor if site.axis in INNER_WIDTHS else 1)
  return local, math.gcd(local, site.group_size)


def _group_parts(site: Exchange, tensor: int) -> int:
  """A GroupNorm site's group parts on one device (its groups when it holds whole ones)."""
  local, part = _local_group_channels(site, tensor)
  return local // part


def _values(site: Exchange, num_patches: int, stored: bool, tensor: int) -> int:
  """Values one device receives (stored=False) or keeps as stale (stored=True) for a non-attention
  patch site, per sample."""
  channels = _channels(site, tensor)
  match site.kind:
    case "halo":
      return 2 * site.halo_rows * site.cols * channels
    case "input_halo":  # exchanged in every step, so never kept as stale state
      return 0 if stored else 2 * site.halo_rows * site.cols * channels
    case "moments":
      return (num_patches if stored else num_patches - 1) * _group_parts(site, tensor) * 2
    case _:
      raise ValueError(f"unknown site kind {site.kind!r}; valid: halo, input_halo, moments (and kv)")


def bytes_per_step(config, height: int, width: int, num_patches: int, batch: int,
                   activation_bytes: int, attention: str = "kv", tensor: int = 1, ulysses: int = 1) -> dict[str, int]:
  """Bytes one interior device receives per synchronous step, by kind, for a local batch.

  `attention`: how self-attention exchanges (`ATTENTION_KINDS`); its bytes are listed under its kind
  (usp: under `alltoall` and `ring`), `ulysses` the all-to-all group size of usp.
  `tensor`: the tensor-parallel degree. The patch kinds are there for more than one patch (a lone
  device has no neighbour to receive from), the tensor kinds for more than one tensor shard.
  """
  if attention not in ATTENTION_KINDS:
    raise ValueError(f"unknown attention exchange {attention!r}; valid: {', '.join(ATTENTION_KINDS)}")
  if num_patches % ulysses:
    raise ValueError(f"{num_patches} token blocks do not split into Ulysses groups of {ulysses}.")
  totals = {}
  if num_patches > 1:
    totals |= _total(config, height, width, num_patches, batch, activation_bytes, stored=False,
                     attention=attention, tensor=tensor, ulysses=ulysses)
  if tensor > 1:
    totals |= tensor_bytes(config, height, width, num_patches, batch, activation_bytes, tensor)
  return totals


def tensor_bytes(config, height: int, width: int, num_patches: int, batch: int, activation_bytes: int,
                 tensor: int) -> dict[str, int]:
  """Tensor parallelism's bytes per step on one device (its rows of `num_patches`): all-reduce payloads
  ("partial_sums") and straddling GroupNorm groups' gathered moments ("group_moments", when any)."""
  totals = {"partial_sums": 0, "group_moments": 0}
  for site in exchange_sites(config, height, width):
    if site.kind == "partial_sums":
      totals["partial_sums"] += batch * activation_bytes * site.rows // num_patches * site.cols * site.channels
    elif site.kind == "moments" and _straddles(site, tensor):
      totals["group_moments"] += batch * MOMENT_BYTES * (tensor - 1) * _group_parts(site, tensor) * 2
  return {kind: size for kind, size in totals.items() if size or kind == "partial_sums"}


def _straddles(site: Exchange, tensor: int) -> bool:
  """A GroupNorm site whose groups' channels lie on several tensor devices."""
  return _local_group_channels(site, tensor)[1] < site.group_size


def ring_allreduce_bytes(payload: int, devices: int) -> int:
  """Bytes a device sends (and receives) in a ring all-reduce of `payload` bytes over `devices`."""
  return 2 * (devices - 1) * payload // devices


def stale_bytes(config, height: int, width: int, num_patches: int, batch: int,
                activation_bytes: int, stale_moments: bool = True, tensor: int = 1) -> dict[str, int]:
  """Bytes of stale buffers one device keeps for the displaced strategy, by kind."""
  totals = _total(config, height, width, num_patches, batch, activation_bytes, stored=True, tensor=tensor)
  totals.pop("input_halo")
  if not stale_moments:
    totals.pop("moments")
  return totals


def _total(config, height, width, num_patches, batch, activation_bytes, stored,
           attention="kv", tensor=1, ulysses=1) -> dict[str, int]:
  attention_kinds = _attention_values(0, num_patches, stored, attention, ulysses)
  totals = {"halo": 0, "input_halo": 0, **dict.fromkeys(attention_kinds, 0), "moments": 0}
  for site in exchange_sites(config, height, width):
    if site.kind == "partial_sums":  # over `tensor`, not `patch`: tensor_bytes
      continue
    if site.kind == "kv":
      patch_values = site.rows // num_patches * site.cols * _channels(site, tensor)
      by_kind = _attention_values(patch_values, num_patches, stored, attention, ulysses)
    else:
      by_kind = {site.kind: _values(site, num_patches, stored, tensor)}
    for kind, values in by_kind.items():
      width_bytes = MOMENT_BYTES if kind == "moments" else activation_bytes
      totals[kind] = totals.get(kind, 0) + batch * width_bytes * values
  return totals
