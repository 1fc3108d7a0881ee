"""Images out of dfjax: [-1, 1] NHWC arrays → 8-bit tiles, grids, labelled sheets and PNG files.

Shape letters: B batch, H rows, W columns, C channels (RGB).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14  # pixels of the caption strip above each sheet column
CHAR_WIDTH = 6  # pixels per character of PIL's default font, for the row-label strip


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats → uint8 in [0, 255] (clipped), same shape."""
  unit = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return np.round(unit * 255.0).astype(np.uint8)


def latents_to_images(latents: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  """Latents (no VAE to decode them) → [-1, 1] RGB pictures of their first three channels.

  Each channel is scaled by the 1st/99th percentiles of `reference` (default: the latents
  themselves) per image, so that latents of several strategies given the same reference are
  drawn on one scale and stay comparable. Fewer than three channels are repeated.
  """
  latents = np.asarray(latents, np.float32)
  reference = latents if reference is None else np.asarray(reference, np.float32)
  channels = [min(c, latents.shape[-1] - 1) for c in range(3)]
  lo = np.percentile(reference[..., channels], 1, axis=(1, 2), keepdims=True)  # B, 1, 1, 3
  hi = np.percentile(reference[..., channels], 99, axis=(1, 2), keepdims=True)
  return np.clip(2.0 * (latents[..., channels] - lo) / np.maximum(hi - lo, 1e-6) - 1.0, -1.0, 1.0)


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """(B, H, W, C) uint8 → one (rows·(H+pad)+pad, columns·(W+pad)+pad, C) tiled image, white gaps."""
  batch, height, width, channels = images.shape
  columns = columns or int(np.ceil(np.sqrt(batch)))
  rows = -(-batch // columns)
  out = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
  for i, image in enumerate(images):
    top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
    out[top:top + height, left:left + width] = image
  return out


def sheet(columns: Sequence[tuple[str, np.ndarray]], pad: int = 2, scale: int = 2,
          row_labels: Sequence[str] | None = None) -> np.ndarray:
  """Side-by-side columns of images, each under its caption: one row per image of the batch.

  Args:
    columns: (caption, (B, H, W, C) uint8 images) pairs, all with the same shape.
    scale: images are enlarged this many times (nearest neighbour) so captions fit.
    row_labels: B labels written in a strip left of the rows (e.g. class names).
  Returns:
    (LABEL_HEIGHT + B·(s·H+pad)+pad, L + n·(s·W+pad)+pad, C) uint8, s = scale, L the label
    strip's width (0 without row labels).
  """
  columns = [(caption, images.repeat(scale, axis=1).repeat(scale, axis=2)) for caption, images in columns]
  stacks = [grid(images, columns=1, pad=pad) for _, images in columns]
  body = np.concatenate([s[:, :-pad] for s in stacks[:-1]] + [stacks[-1]], axis=1)
  left = 0 if row_labels is None else CHAR_WIDTH * max(len(label) for label in row_labels) + 2 * pad
  canvas = Image.new("RGB", (left + body.shape[1], body.shape[0] + LABEL_HEIGHT), "white")
  canvas.paste(Image.fromarray(body), (left, LABEL_HEIGHT))
  draw = ImageDraw.Draw(canvas)
  column_width, row_height = columns[0][1].shape[2] + pad, columns[0][1].shape[1] + pad
  for i, (caption, _) in enumerate(columns):
    draw.text((left + pad + i * column_width, 1), caption, fill="black")
  for i, label in enumerate(row_labels or ()):
    draw.text((pad, LABEL_HEIGHT + pad + i * row_height + row_height // 2 - 6), label, fill="black")
  return np.asarray(canvas)


def difference(images: np.ndarray, reference: np.ndarray, gain: float) -> np.ndarray:
  """|images − reference| × gain as uint8 pictures (black = identical), inputs in [-1, 1]."""
  diff = np.abs(np.asarray(images, np.float32) - np.asarray(reference, np.float32)) / 2.0  # in [0, 1]
  return np.round(np.clip(diff * gain, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike, scale: int = 1) -> Path:
  """Writes an (H, W, C) uint8 image as PNG, upscaled `scale`× with nearest neighbours."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  picture = Image.fromarray(image)
  if scale > 1:
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  picture.save(path)
  return path
