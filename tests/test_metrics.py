"""PSNR and SSIM: hand-computed values, a direct windowed SSIM formula, ranges and bad input."""

import numpy as np
import pytest

from dfjax import metrics


def _images(seed, shape=(2, 16, 16, 3)):
  return np.random.default_rng(seed).random(shape)


def test_psnr_hand_computed():
  x = np.zeros((2, 4, 4, 1))
  y = x.copy()
  y[0] += 0.1                       # MSE 0.01 → 10·log10(1 / 0.01) = 20 dB
  y[1, 0, 0, 0] = 1.0               # MSE 1/16 → 10·log10(16) = 12.0412 dB
  np.testing.assert_allclose(metrics.psnr(y, x), [20.0, 10 * np.log10(16)], rtol=1e-12)
  # The scale only matters through data_range.
  np.testing.assert_allclose(metrics.psnr(255 * y, 255 * x, data_range=255.0), metrics.psnr(y, x), rtol=1e-12)
  np.testing.assert_allclose(metrics.psnr(2 * y - 1, 2 * x - 1, data_range=2.0), metrics.psnr(y, x), rtol=1e-12)


def test_psnr_of_identical_images_is_inf_and_is_symmetric():
  x, y = _images(0), _images(1)
  assert np.all(np.isinf(metrics.psnr(x, x)))
  np.testing.assert_array_equal(metrics.psnr(x, y), metrics.psnr(y, x))
  assert np.all(metrics.psnr(x, y) > 0)  # uniform noise in [0, 1]: MSE ≈ 1/6, PSNR ≈ 7.8 dB
  np.testing.assert_allclose(metrics.psnr(x, y), 10 * np.log10(6), atol=0.5)


def test_json_values_have_no_nan_or_infinity():
  x = _images(0)
  y = x.copy()
  y[1, 0, 0, 0] = 1 - y[1, 0, 0, 0]
  psnr_b = metrics.psnr(y, x)  # image 0 identical: ∞ dB
  assert metrics.json_values(psnr_b)[0] is None and metrics.identical(psnr_b) == [True, False]
  assert metrics.json_values(psnr_b)[1] == pytest.approx(psnr_b[1]) and np.isfinite(psnr_b[1])
  assert metrics.json_values(np.array([np.nan, -np.inf, 2.5])) == [None, None, 2.5]
  assert metrics.identical(np.array([np.nan, -np.inf, 2.5])) == [False, False, False]


def _ssim_direct(x, y, data_range, window=11, sigma=1.5):
  """SSIM written out: the 2-D Gaussian window placed at every valid position, one by one."""
  offsets = np.arange(window) - (window - 1) / 2
  g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
  g /= g.sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  batch, height, width, channels = x.shape
  out = np.zeros(batch)
  for b in range(batch):
    values = []
    for c in range(channels):
      for i in range(height - window + 1):
        for j in range(width - window + 1):
          px, py = x[b, i:i + window, j:j + window, c], y[b, i:i + window, j:j + window, c]
          mx, my = (g * px).sum(), (g * py).sum()
          vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
          cov = (g * (px - mx) * (py - my)).sum()
          values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    out[b] = np.mean(values)
  return out


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_matches_the_direct_formula(data_range):
  x = _images(2, (2, 16, 14, 2)) * data_range
  y = np.clip(x + 0.2 * data_range * _images(3, x.shape) - 0.1 * data_range, 0, data_range)
  np.testing.assert_allclose(metrics.ssim(x, y, data_range=data_range), _ssim_direct(x, y, data_range),
                             rtol=1e-10)


def test_ssim_range():
  x = _images(4)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-12)
  noisy = np.clip(x + 0.05 * _images(5), 0, 1)
  unrelated = _images(6)
  s_noisy, s_unrelated, s_inverted = metrics.ssim(noisy, x), metrics.ssim(unrelated, x), metrics.ssim(1 - x, x)
  assert np.all((s_noisy < 1) & (s_noisy > s_unrelated))
  assert np.all(np.abs(s_unrelated) < 0.2)
  assert np.all(s_inverted < 0) and np.all(s_inverted >= -1)


def test_to_unit_range_clips():
  np.testing.assert_array_equal(metrics.to_unit_range(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])),
                                [0.0, 0.0, 0.5, 1.0, 1.0])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="same shape"):
    metrics.psnr(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    metrics.ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="window does not fit"):
    metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), data_range=0)
