"""Image fidelity metrics: PSNR and SSIM of images against a reference, one value per image.

Both take batches of NHWC float images on a common scale whose full range is `data_range`
(1.0 for images in [0, 1], 2.0 for [-1, 1], 255.0 for 8-bit values) and return one value per
image. They are numpy functions: metrics are computed on host copies of finished images, and
numpy keeps them independent of the device mesh that produced the images.

SSIM is the standard formulation of Wang et al. (2004): an 11×11 Gaussian window with σ = 1.5,
K1 = 0.01, K2 = 0.03, population (biased) local variances, computed per channel over the window
positions that fit inside the image ("valid"), averaged over positions and channels. This is
what scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)` computes, up to its choice of border handling.

Shape letters: B batch, H rows, W columns, C channels.
"""

from __future__ import annotations

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"images to compare must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"images must be a (B, H, W, C) batch, got shape {x.shape}")
  if not data_range > 0:
    raise ValueError(f"data_range must be positive, got {data_range}")
  return x, y


def psnr(x: np.ndarray, reference: np.ndarray, *, data_range: float = 1.0) -> np.ndarray:
  """Peak signal-to-noise ratio in dB of each image of `x` against `reference`.

  PSNR = 10·log10(data_range² / MSE), the MSE over all of an image's pixels and channels.
  Identical images have MSE 0 and PSNR `inf` (no cap): callers averaging over images should
  expect it (`numpy.mean` of a batch that contains one is inf), and JSON has no `inf`
  (`json_values`, `identical`).

  Args:
    x, reference: (B, H, W, C) float arrays on the same scale.
    data_range: the full range of that scale (max − min possible value).
  Returns:
    (B,) float64 PSNR values in dB.
  """
  x, reference = _check_pair(x, reference, data_range)
  mse_b = np.mean((x - reference) ** 2, axis=(1, 2, 3))  # B
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range**2 / mse_b)  # B


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The normalised 1-D Gaussian of the SSIM window (the 2-D window is its outer product)."""
  offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(offsets**2) / (2 * sigma**2))
  return g / g.sum()


def _valid_filter_matrix(n: int, g: np.ndarray) -> np.ndarray:
  """(n − k + 1, n) matrix M with (M @ v)[i] = Σ_j g[j] v[i + j]: a "valid" 1-D correlation."""
  k = g.size
  m = np.zeros((n - k + 1, n))
  for i in range(n - k + 1):
    m[i, i:i + k] = g
  return m


def ssim(x: np.ndarray, reference: np.ndarray, *, data_range: float = 1.0,
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Structural similarity of each image of `x` to `reference` (mean SSIM over the image).

  Args:
    x, reference: (B, H, W, C) float arrays on the same scale, H and W at least `window`.
    data_range: the full range of that scale.
    window, sigma: the Gaussian window's size and standard deviation (standard: 11, 1.5).
  Returns:
    (B,) float64 values in [-1, 1]; 1 for identical images.
  """
  x, reference = _check_pair(x, reference, data_range)
  _, height, width, _ = x.shape
  if min(height, width) < window:
    raise ValueError(f"SSIM's {window}×{window} window does not fit {height}×{width} images")
  g = gaussian_window(window, sigma)
  rows, cols = _valid_filter_matrix(height, g), _valid_filter_matrix(width, g)  # h, H / w, W

  def blur(a_bhwc):  # the window-weighted local mean at every valid position
    a_bhwc = np.einsum("hH,bHWc->bhWc", rows, a_bhwc)  # B, h, W, C
    return np.einsum("bhWc,wW->bhwc", a_bhwc, cols)  # B, h, w, C

  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  mu_x, mu_y = blur(x), blur(reference)  # B, h, w, C
  var_x = blur(x * x) - mu_x**2
  var_y = blur(reference * reference) - mu_y**2
  cov = blur(x * reference) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
              / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))  # B, h, w, C
  return ssim_map.mean(axis=(1, 2, 3))  # B


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """Model-space images in [-1, 1] → float images in [0, 1] (clipped), the metrics' scale."""
  return np.clip((np.asarray(images, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def json_values(values: np.ndarray) -> list[float | None]:
  """`values` as JSON numbers; JSON has no NaN or ∞, so a non-finite one (identical images' PSNR) is None."""
  return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64).ravel()]


def identical(psnr_db: np.ndarray) -> list[bool]:
  """Which images of a PSNR batch equal their reference exactly (PSNR ∞: MSE 0)."""
  return [bool(v) for v in np.isposinf(np.asarray(psnr_db, np.float64)).ravel()]
