"""Where a drawn thing lands on the model's pooled token grid.

The vision tower sees an image resized to its square input; 2D pooling leaves a ``grid`` x ``grid`` grid
of tokens, row-major, each summarising one equal cell of the image. :func:`cell_pixel_counts` counts a
mask's pixels per cell, with the cell edges the CT slab renderer and the stage-1 token targets use.
"""

from __future__ import annotations

import numpy as np


def cell_pixel_counts(mask: np.ndarray, grid: int) -> np.ndarray:
    """``(grid * grid,)`` int64: the pixels of a boolean ``(height, width)`` ``mask`` in each cell of a
    ``grid`` x ``grid`` split (edges at ``linspace(0, side, grid + 1)`` rounded), row-major."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or grid < 1 or grid > min(mask.shape):
        raise ValueError(f"cell_pixel_counts needs a 2-D mask at least grid px a side, got shape {mask.shape}, "
                         f"grid {grid}")
    row_edges = np.linspace(0, mask.shape[0], grid + 1).round().astype(int)[:-1]
    col_edges = np.linspace(0, mask.shape[1], grid + 1).round().astype(int)[:-1]
    rows = np.add.reduceat(mask.astype(np.int64), row_edges, axis=0)  # (grid, width)
    return np.add.reduceat(rows, col_edges, axis=1).ravel()  # (grid * grid,)
