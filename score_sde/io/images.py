"""PNG sample grids: what people look at instead of numbers."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from score_sde.io import files


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2,
               pad_value: float = 1.0) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: `[N, H, W, C]` floats in [0, 1] (values outside are clipped), C = 1 or 3.
    nrow: images per row (default: ceil(sqrt(N))).
    padding: pixels between images and around the border.
    pad_value: gray level of the padding.

  Returns:
    `[rows * (H + p) + p, nrow * (W + p) + p, C]` uint8.
  """
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
  n, h, w, c = images.shape
  nrow = nrow or math.ceil(math.sqrt(n))
  rows = math.ceil(n / nrow)
  grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                 pad_value, np.float32)
  for i in range(n):
    r, q = divmod(i, nrow)
    top, left = padding + r * (h + padding), padding + q * (w + padding)
    grid[top:top + h, left:left + w] = images[i]
  return np.round(grid * 255.0).astype(np.uint8)


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None,
              scale: int = 1, *, overwrite: bool = False, flag: str | None = None) -> str:
  """Writes `image_grid(images, nrow)` as a PNG, upscaled `scale` times (nearest), atomically
  (`files.write_atomic`: an existing `path` is replaced only with `overwrite`, else
  FileExistsError naming `flag`); returns the path."""
  grid = image_grid(images, nrow)
  picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if scale > 1:
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  return files.write_atomic(path, lambda f: picture.save(f, format="PNG"),
                            overwrite=overwrite, flag=flag)


def save_side_by_side(panels: dict[str, np.ndarray], path: str | os.PathLike,
                      nrow: int | None = None, scale: int = 2, *, overwrite: bool = False,
                      flag: str | None = None) -> str:
  """Writes several sample sets next to each other with a title over each (e.g. the PC and
  ODE samplers from the same noise), atomically and never over an existing file unless
  `overwrite` (as `save_grid`); returns the path."""
  files.check_new(path, overwrite=overwrite, flag=flag)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
  for ax, (title, images) in zip(axes[0], panels.items()):
    grid = image_grid(images, nrow)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
  fig.tight_layout()
  try:
    return files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100 * scale // 2),
                              overwrite=overwrite, flag=flag)
  finally:
    plt.close(fig)
