"""A procedural, seeded, class-labelled image dataset: 64×64 RGB shapes that span the frame.

Nothing is downloaded: every image is drawn from a handful of random numbers per sample. Each
class is one large pattern (a disc, a ring, stripes, bands, bars, a triangle, a checkerboard, a
soft radial blob, a cross, concentric squares) over a two-colour linear-gradient background. The
patterns are big on purpose: their edges, stripes and gradients cross every row-patch boundary
(1/2, 1/4, 1/8 of the height), so a patch-parallel sampler that loses cross-patch context leaves
visible seams, broken lines and mismatched colours.

Patterns are signed distances on the [-1, 1]² frame, turned into anti-aliased masks with a
one-pixel ramp, so edges are smooth and the whole batch is a few broadcast numpy operations.

Shape letters: B batch, H rows, W columns, C channels (RGB).
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 64
class_names: tuple[str, ...] = (
    "circle", "ring", "diagonal_stripes", "horizontal_bands", "vertical_bars",
    "triangle", "checkerboard", "radial_gradient", "cross", "concentric_squares",
)
num_classes: int = len(class_names)

_PIXEL = 2.0 / IMAGE_SIZE  # one pixel in frame units


def batch(seed: int | np.random.Generator, size: int, *, labels: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """Draws `size` labelled images; the same seed always gives the same batch.

  Args:
    seed: an int (or a sequence of ints, e.g. `(seed, step)`) for `np.random.default_rng`, or a
      Generator to draw from.
    size: number of images B.
    labels: (B,) class ids to draw, instead of uniformly random ones.
  Returns:
    images (B, 64, 64, 3) float32 in [-1, 1], NHWC; labels (B,) int32 in [0, num_classes).
  Raises:
    ValueError: a negative size, or labels of the wrong shape or out of range.
  """
  if not isinstance(size, (int, np.integer)) or size < 0:
    raise ValueError(f"size must be a non-negative int, got {size!r}")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  if labels is None:
    labels = rng.integers(0, num_classes, size)
  labels = np.asarray(labels, np.int32)
  if labels.shape != (size,) or (size and not 0 <= labels.min() <= labels.max() < num_classes):
    raise ValueError(f"labels must have shape ({size},) and values in [0, {num_classes}); "
                     f"got shape {labels.shape}, values {np.unique(labels)[:8].tolist()}")
  # Every sample draws the same random numbers in the same order whatever its class, so a
  # sample's image depends only on (seed, its index, its label).
  u = rng.random((size, 8), np.float32)  # B, 8 shape parameters in [0, 1)
  fg, bg0, bg1, direction = _colours(rng, size)
  y, x = _grid()  # 1, H, W
  alpha = np.zeros((size, IMAGE_SIZE, IMAGE_SIZE), np.float32)  # B, H, W
  for k, draw in enumerate(_PATTERNS):
    members = np.flatnonzero(labels == k)
    if members.size:
      alpha[members] = draw(x, y, u[members].T[:, :, None, None])
  ramp = (x * direction[:, :1, None] + y * direction[:, 1:, None]) * 0.5 + 0.5  # B, H, W in [0, 1]
  ramp = np.clip(ramp, 0.0, 1.0)[..., None]
  background = bg0[:, None, None] * (1 - ramp) + bg1[:, None, None] * ramp  # B, H, W, C
  image = background + alpha[..., None] * (fg[:, None, None] - background)  # B, H, W, C in [0, 1]
  return (2.0 * image - 1.0).astype(np.float32), labels


# ---------------------------------------------------------------------------------- colours

def _colours(rng: np.random.Generator, size: int):
  """Foreground, two background colours (B, 3) and a unit gradient direction (B, 2).

  One of {foreground, background} is drawn light ([0.55, 1]) and the other dark ([0, 0.45]),
  sides swapped at random, so every shape stands out from its background.
  """
  f32 = np.float32
  light = 0.55 + 0.45 * rng.random((size, 3), f32)
  dark = 0.45 * rng.random((size, 2, 3), f32)
  swap = rng.random(size, f32) < 0.5
  bg_light = np.clip(light[:, None] + 0.25 * (rng.random((size, 2, 3), f32) - 0.5), 0.55, 1.0)
  fg = np.where(swap[:, None], dark[:, 0], light)
  bg = np.where(swap[:, None, None], bg_light, dark)
  angle = 2 * np.pi * rng.random(size, f32)
  direction = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(f32)
  return fg, bg[:, 0], bg[:, 1], direction


def _grid() -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1]: y down the rows, x along the columns, (1, H, W)."""
  c = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) * _PIXEL - 1.0
  return c[None, :, None] + 0 * c[None, None, :], c[None, None, :] + 0 * c[None, :, None]


def _fill(sdf: np.ndarray) -> np.ndarray:
  """Signed distance (negative inside) → anti-aliased coverage in [0, 1], one-pixel ramp."""
  return np.clip(0.5 - sdf / _PIXEL, 0.0, 1.0).astype(np.float32)


def _lerp(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
  return lo + (hi - lo) * u


def _rotate(x, y, angle):
  c, s = np.cos(angle), np.sin(angle)
  return c * x + s * y, -s * x + c * y


def _stripes(coord: np.ndarray, period: np.ndarray, phase: np.ndarray, duty: np.ndarray) -> np.ndarray:
  """Periodic bands along `coord`: signed distance to the nearest band of width duty·period."""
  t = np.mod(coord / period + phase, 1.0)  # position within the period, in [0, 1)
  return (np.abs(t - 0.5) - duty / 2) * period


# ---------------------------------------------------------------------------------- patterns
# Each takes the grid (1, H, W) and the 8 uniform parameters u[0..7], each (b, 1, 1), and
# returns the coverage (b, H, W). Sizes are in frame units ([-1, 1] spans the image).

def _circle(x, y, u):
  cx, cy, r = _lerp(u[0], -0.3, 0.3), _lerp(u[1], -0.3, 0.3), _lerp(u[2], 0.5, 0.8)
  return _fill(np.hypot(x - cx, y - cy) - r)


def _ring(x, y, u):
  cx, cy = _lerp(u[0], -0.2, 0.2), _lerp(u[1], -0.2, 0.2)
  r, w = _lerp(u[2], 0.45, 0.75), _lerp(u[3], 0.06, 0.13)
  return _fill(np.abs(np.hypot(x - cx, y - cy) - r) - w)


def _diagonal_stripes(x, y, u):
  angle = np.where(u[4] < 0.5, 1, -1) * _lerp(u[0], np.pi / 6, np.pi / 3)
  along, _ = _rotate(x, y, angle)
  return _fill(_stripes(along, _lerp(u[1], 0.3, 0.55), u[2], _lerp(u[3], 0.35, 0.55)))


def _horizontal_bands(x, y, u):
  tilt = _lerp(u[0], -0.08, 0.08)
  return _fill(_stripes(y + tilt * x, _lerp(u[1], 0.35, 0.7), u[2], _lerp(u[3], 0.35, 0.55)))


def _vertical_bars(x, y, u):
  tilt = _lerp(u[0], -0.08, 0.08)
  return _fill(_stripes(x + tilt * y, _lerp(u[1], 0.45, 0.8), u[2], _lerp(u[3], 0.2, 0.35)))


def _triangle(x, y, u):
  """An equilateral triangle (circumradius r), apex up, rotated by up to ±15°."""
  cx, cy, r = _lerp(u[0], -0.15, 0.15), _lerp(u[1], -0.05, 0.2), _lerp(u[2], 0.75, 1.0)
  px, py = _rotate(x - cx, y - cy, _lerp(u[3], -np.pi / 12, np.pi / 12))
  # Distance to the three edge lines (outward normals at 90°, 210°, 330°, y pointing down).
  sdf = np.full(np.broadcast_shapes(px.shape, r.shape), -np.inf, np.float32)
  for normal in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6):
    sdf = np.maximum(sdf, px * np.cos(normal) + py * np.sin(normal) - r / 2)
  return _fill(sdf)


def _checkerboard(x, y, u):
  cell = _lerp(u[0], 0.25, 0.5)
  px, py = _rotate(x, y, _lerp(u[1], -np.pi / 12, np.pi / 12))
  dx = _stripes(px, 2 * cell, u[2], np.float32(0.5))  # < 0 inside the "on" columns
  dy = _stripes(py, 2 * cell, u[3], np.float32(0.5))
  # XOR of the two stripe sets; the distance to the nearest cell edge is min(|dx|, |dy|).
  return _fill(np.sign(dx * dy) * -np.minimum(np.abs(dx), np.abs(dy)))


def _radial_gradient(x, y, u):
  cx, cy, reach = _lerp(u[0], -0.5, 0.5), _lerp(u[1], -0.5, 0.5), _lerp(u[2], 0.9, 1.5)
  t = np.clip(np.hypot(x - cx, y - cy) / reach, 0.0, 1.0)
  return (1.0 - t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep fall-off


def _cross(x, y, u):
  cx, cy = _lerp(u[0], -0.2, 0.2), _lerp(u[1], -0.2, 0.2)
  px, py = _rotate(x - cx, y - cy, _lerp(u[2], -np.pi / 12, np.pi / 12))
  arm, half = _lerp(u[3], 0.1, 0.2), _lerp(u[4], 0.65, 0.9)
  bar = lambda a, b: np.maximum(np.abs(a) - half, np.abs(b) - arm)  # a box's (L∞) distance
  return _fill(np.minimum(bar(px, py), bar(py, px)))


def _concentric_squares(x, y, u):
  cx, cy = _lerp(u[0], -0.25, 0.25), _lerp(u[1], -0.25, 0.25)
  d = np.maximum(np.abs(x - cx), np.abs(y - cy))  # L∞ distance from the centre
  return _fill(_stripes(d, _lerp(u[2], 0.22, 0.35), u[3], np.float32(0.5)))


_PATTERNS = (_circle, _ring, _diagonal_stripes, _horizontal_bands, _vertical_bars,
             _triangle, _checkerboard, _radial_gradient, _cross, _concentric_squares)
assert len(_PATTERNS) == num_classes
