"""A giant raster as LongLLaVA's sub-image input: a padded thumbnail plus a row-major tile grid.

Geometry (all integers; ``T`` = tile size, ``s`` = scale, the level chosen):

* the raster at scale ``s`` is ``ceil(W / s) x ceil(H / s)`` "level pixels"; each level pixel is
  the average of ``s x s`` source pixels (``s = 1``: full resolution; GDAL reads from a file's
  overviews when it has matching ones, as COGs do);
* the grid is ``rows = ceil(level_h / T)`` by ``cols = ceil(level_w / T)``; ``s`` is the smallest
  integer for which ``rows * cols <= max_tiles``;
* the level image is centred on the ``cols*T x rows*T`` canvas: ``left = (cols*T - level_w) // 2``
  and ``right`` takes the remainder (odd padding puts the extra pixel right/bottom; no pixel is
  lost), and likewise top/bottom. Padding is less than one tile, so every tile holds data;
* tile ``(r, c)`` (0-based here; the prompt and answers count rows and columns from 1) covers
  level pixels ``[c*T - left, (c+1)*T - left)`` clipped to the image, which is the source window
  ``[x0*s, min(W, x1*s))``. The windows of all tiles partition the raster: every source pixel is in
  exactly one tile.

Padding and nodata use one colour everywhere (:data:`PAD_COLOUR`, CLIP's mean), in the tiles and in
the thumbnail. Tiles are read lazily, window by window (strip by strip for PNG/JPEG), so a
1000-tile grid never sits in memory at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from domain_data.remote_sensing.errors import RasterInputError
from domain_data.remote_sensing.raster import PAD_COLOUR, Raster, open_raster
from longllava.protocol import grid_prompt

DEFAULT_TILE_SIZE = 336
# 256 tiles x 144 tokens = 36,864 image tokens: fits a 9B LongLLaVA on one 80 GB GPU with room to
# spare. Apps pass a budget from the planner; the paper goes up to about 1000 images.
DEFAULT_MAX_TILES = 256


@dataclass(frozen=True)
class Padding:
    """Centred padding of the level image on the tile canvas, in tile (level) pixels."""

    left: int
    top: int
    right: int
    bottom: int

    def to_dict(self) -> dict:
        return {"left": self.left, "top": self.top, "right": self.right, "bottom": self.bottom}


@dataclass(frozen=True)
class TileInfo:
    """One tile: grid position (0-based), source pixel window, where the data sits in the tile image
    (``placement`` = x0, y0, x1, y1 in tile pixels) and, when georeferenced, its bounds."""

    index: int
    row: int
    col: int
    window: Window
    placement: tuple[int, int, int, int]
    crs_bounds: tuple[float, float, float, float] | None
    lonlat_bounds: tuple[float, float, float, float] | None
    scale: int = 1

    @property
    def label(self) -> str:
        """How the prompt and the app name this tile (1-based)."""
        return f"row {self.row + 1}, column {self.col + 1}"

    def pixel_window(self) -> dict:
        return {"col_off": int(self.window.col_off), "row_off": int(self.window.row_off),
                "width": int(self.window.width), "height": int(self.window.height)}

    def tile_to_source(self, u: float, v: float) -> tuple[float, float]:
        """Tile pixel coordinates (0..T, may lie in the padding) -> source pixel coordinates."""
        px0, py0, _, _ = self.placement
        return float(self.window.col_off + (u - px0) * self.scale), float(self.window.row_off + (v - py0) * self.scale)

    def to_dict(self) -> dict:
        return {
            "index": self.index, "row": self.row + 1, "col": self.col + 1,
            "pixel_window": self.pixel_window(), "placement": list(self.placement),
            "crs_bounds": list(self.crs_bounds) if self.crs_bounds else None,
            "lonlat_bounds": list(self.lonlat_bounds) if self.lonlat_bounds else None,
        }


@dataclass(frozen=True)
class GridPlan:
    """The level and grid chosen for a raster (no pixels read)."""

    width: int
    height: int
    tile_size: int
    max_tiles: int
    scale: int
    level_width: int
    level_height: int
    rows: int
    cols: int
    padding: Padding
    note: str

    @property
    def tile_count(self) -> int:
        return self.rows * self.cols

    @property
    def downsampled(self) -> bool:
        return self.scale > 1


def _grid_at(width: int, height: int, tile_size: int, scale: int) -> tuple[int, int, int, int]:
    level_w, level_h = math.ceil(width / scale), math.ceil(height / scale)
    return level_w, level_h, math.ceil(level_h / tile_size), math.ceil(level_w / tile_size)


def plan_grid(width: int, height: int, tile_size: int = DEFAULT_TILE_SIZE,
              max_tiles: int = DEFAULT_MAX_TILES) -> GridPlan:
    """Choose the smallest integer scale whose grid fits ``max_tiles``, and the centred padding."""
    if not isinstance(tile_size, int) or tile_size < 1:
        raise RasterInputError(f"tile_size must be a positive integer, got {tile_size!r}")
    if not isinstance(max_tiles, int) or max_tiles < 1:
        raise RasterInputError(f"max_tiles must be a positive integer, got {max_tiles!r}")
    # Lower bound on the scale from the area, then step up until the grid fits.
    scale = max(1, math.floor(math.sqrt(width * height / (max_tiles * tile_size * tile_size))))
    while True:
        level_w, level_h, rows, cols = _grid_at(width, height, tile_size, scale)
        if rows * cols <= max_tiles:
            break
        scale += 1
    pad_w, pad_h = cols * tile_size - level_w, rows * tile_size - level_h
    padding = Padding(pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)
    if scale == 1:
        note = f"full resolution: {rows} x {cols} = {rows * cols} tiles of {tile_size} px (budget {max_tiles})"
    else:
        _, _, rows1, cols1 = _grid_at(width, height, tile_size, 1)
        note = (f"downsampled 1:{scale} to fit the budget of {max_tiles} tiles: full resolution would need "
                f"{rows1} x {cols1} = {rows1 * cols1} tiles; each tile pixel is the average of {scale} x {scale} "
                f"source pixels, giving {rows} x {cols} = {rows * cols} tiles")
    return GridPlan(width, height, tile_size, max_tiles, scale, level_w, level_h, rows, cols, padding, note)


def _axis_span(index: int, tile_size: int, pad: int, level_size: int, scale: int,
               source_size: int) -> tuple[int, int, int, int]:
    """Tile ``index`` along one axis -> (source start, source stop, placement start, placement stop)."""
    start = index * tile_size - pad
    level0, level1 = max(0, start), min(level_size, start + tile_size)
    return level0 * scale, min(source_size, level1 * scale), level0 - start, level1 - start


def _lonlat_bounds(crs: object, bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    return float(west), float(south), float(east), float(north)


def plan_tiles(raster: Raster, plan: GridPlan) -> tuple[TileInfo, ...]:
    """Every tile's window, placement and bounds, in row-major order."""
    rows_spans = [_axis_span(r, plan.tile_size, plan.padding.top, plan.level_height, plan.scale, plan.height)
                  for r in range(plan.rows)]
    col_spans = [_axis_span(c, plan.tile_size, plan.padding.left, plan.level_width, plan.scale, plan.width)
                 for c in range(plan.cols)]
    tiles = []
    for r, (y0, y1, py0, py1) in enumerate(rows_spans):
        for c, (x0, x1, px0, px1) in enumerate(col_spans):
            window = Window(x0, y0, x1 - x0, y1 - y0)
            crs_bounds = lonlat = None
            if raster.georeferenced:
                crs_bounds = tuple(float(v) for v in window_bounds(window, raster.transform))
                lonlat = _lonlat_bounds(raster.crs, crs_bounds)
            tiles.append(TileInfo(len(tiles), r, c, window, (px0, py0, px1, py1), crs_bounds, lonlat, plan.scale))
    return tuple(tiles)


def _axis_parts(offset: int, length: int, out_length: int, scale: int) -> list[tuple[int, int, int, int]]:
    """Split one axis of a window into (out start, out stop, source start, source length) parts: the
    level pixels made of whole ``scale``-pixel blocks, then the last, partial one (at the raster edge)."""
    whole = min(out_length, length // scale)
    parts = [(0, whole, offset, whole * scale)] if whole else []
    if whole < out_length:
        parts.append((whole, out_length, offset + whole * scale, length - whole * scale))
    return parts


def read_level_window(raster: Raster, window: Window, out_shape: tuple[int, int], scale: int) -> np.ndarray:
    """(h, w, 3) uint8 of ``window`` at 1:``scale``: every output pixel is the average of exactly the
    ``scale`` x ``scale`` source block it stands for (fewer pixels at the right/bottom raster edge)."""
    out_h, out_w = out_shape
    if scale == 1:
        return raster.read_window(window)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for oy0, oy1, sy0, sh in _axis_parts(int(window.row_off), int(window.height), out_h, scale):
        for ox0, ox1, sx0, sw in _axis_parts(int(window.col_off), int(window.width), out_w, scale):
            out[oy0:oy1, ox0:ox1] = raster.read_window(Window(sx0, sy0, sw, sh), (oy1 - oy0, ox1 - ox0))
    return out


class LazyTiles(Sequence):
    """The tiles as a read-on-demand sequence of PIL images (row-major). Iterating reads one tile
    (or, for PNG/JPEG, one row of tiles) at a time."""

    def __init__(self, tiled: TiledImage) -> None:
        self._tiled = tiled

    def __len__(self) -> int:
        return len(self._tiled.tile_infos)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._tiled.read_tile(i) for i in range(*index.indices(len(self)))]
        return self._tiled.read_tile(index)

    def __iter__(self) -> Iterator[Image.Image]:
        return self._tiled.iter_tiles()


@dataclass
class TiledImage:
    """A raster as thumbnail + tiles. ``tiles`` is lazy; ``images()`` yields thumbnail then tiles,
    the order :attr:`prompt` expects."""

    raster: Raster
    plan: GridPlan
    tile_infos: tuple[TileInfo, ...]
    thumbnail: Image.Image
    thumbnail_box: tuple[int, int, int, int]
    owns_raster: bool = False
    pad_colour: tuple[int, int, int] = field(default=PAD_COLOUR)
    tile_labels: bool = False  # write each tile's (row,column) before it in :attr:`prompt`

    # -- shape -----------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.plan.rows, self.plan.cols

    @property
    def tile_size(self) -> int:
        return self.plan.tile_size

    @property
    def scale(self) -> int:
        return self.plan.scale

    @property
    def level(self) -> int:
        """Same as :attr:`scale`: source pixels per tile pixel along each axis (1 = full resolution)."""
        return self.plan.scale

    @property
    def downsampled(self) -> bool:
        return self.plan.downsampled

    @property
    def note(self) -> str:
        return self.plan.note

    @property
    def padding(self) -> Padding:
        return self.plan.padding

    @property
    def georeferenced(self) -> bool:
        return self.raster.georeferenced

    @property
    def prompt(self) -> str:
        """The visual prompt: thumbnail, ``\\n``, then the rows of tiles (longllava.protocol)."""
        return grid_prompt(self.plan.rows, self.plan.cols, thumbnail=True, tile_labels=self.tile_labels)

    @property
    def tiles(self) -> LazyTiles:
        return LazyTiles(self)

    def tile_at(self, row: int, col: int) -> TileInfo:
        """The tile at 0-based ``row``, ``col``."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"tile ({row}, {col}) is outside the {rows} x {cols} grid (0-based)")
        return self.tile_infos[row * cols + col]

    # -- pixels ----------------------------------------------------------------------------------
    def _level_shape(self, info: TileInfo) -> tuple[int, int]:
        px0, py0, px1, py1 = info.placement
        return py1 - py0, px1 - px0

    def _compose(self, info: TileInfo, rgb: np.ndarray) -> Image.Image:
        size = self.plan.tile_size
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        canvas[:] = self.pad_colour
        px0, py0, px1, py1 = info.placement
        canvas[py0:py1, px0:px1] = rgb
        return Image.fromarray(canvas)

    def read_tile(self, index: int) -> Image.Image:
        """Tile ``index`` (row-major, 0-based; negative counts from the end) as a T x T RGB image."""
        info = self.tile_infos[index]
        return self._compose(info, read_level_window(self.raster, info.window, self._level_shape(info), self.scale))

    def iter_tiles(self) -> Iterator[Image.Image]:
        """Tiles in row-major order, read one at a time (PNG/JPEG: one strip of tiles at a time)."""
        if not self.raster.sequential:
            for info in self.tile_infos:
                yield self._compose(info, read_level_window(self.raster, info.window, self._level_shape(info),
                                                            self.scale))
            return
        cols = self.plan.cols
        for r in range(self.plan.rows):
            row_infos = self.tile_infos[r * cols:(r + 1) * cols]
            first = row_infos[0]
            strip_window = Window(0, first.window.row_off, self.plan.width, first.window.height)
            level_h = first.placement[3] - first.placement[1]
            strip = read_level_window(self.raster, strip_window, (level_h, self.plan.level_width), self.scale)
            offset = 0
            for info in row_infos:
                width = info.placement[2] - info.placement[0]
                yield self._compose(info, strip[:, offset:offset + width])
                offset += width

    def images(self) -> Iterator[Image.Image]:
        """Thumbnail first, then the tiles in row-major order (the order of :attr:`prompt`)."""
        yield self.thumbnail
        yield from self.iter_tiles()

    # -- coordinates -----------------------------------------------------------------------------
    def thumbnail_to_source(self, u: float, v: float) -> tuple[float, float]:
        """Thumbnail pixel coordinates -> source pixel coordinates (linear, through the padding)."""
        x0, y0, x1, y1 = self.thumbnail_box
        return ((u - x0) * self.plan.width / (x1 - x0), (v - y0) * self.plan.height / (y1 - y0))

    def source_to_crs(self, x: float, y: float) -> tuple[float, float]:
        """Source pixel coordinates -> coordinates in the raster's CRS (needs a georeference)."""
        cx, cy = self.raster.transform @ (x, y)
        return float(cx), float(cy)

    # -- description -----------------------------------------------------------------------------
    def describe(self) -> dict:
        plan = self.plan
        return {
            "tile_size": plan.tile_size,
            "max_tiles": plan.max_tiles,
            "grid": [plan.rows, plan.cols],
            "tile_count": plan.tile_count,
            "level": {"scale": plan.scale, "downsampled": plan.downsampled, "note": plan.note,
                      "level_size": [plan.level_width, plan.level_height]},
            "padding": plan.padding.to_dict(),
            "thumbnail_box": list(self.thumbnail_box),
            "pad_colour": list(self.pad_colour),
            "image_order": "thumbnail, then tiles row by row (rows and columns counted from 1 in text)",
        }

    def close(self) -> None:
        """Close the raster if this object opened it (reads reopen it on demand)."""
        if self.owns_raster:
            self.raster.close()

    def __enter__(self) -> TiledImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def tile_image(raster_or_path: Raster | str | os.PathLike, tile_size: int = DEFAULT_TILE_SIZE,
               max_tiles: int = DEFAULT_MAX_TILES, bands: tuple[int, int, int] | None = None,
               tile_labels: bool = False) -> TiledImage:
    """Plan the grid, read the thumbnail and return a :class:`TiledImage` whose tiles read lazily.

    A path is opened with :func:`open_raster` (``bands`` applies then) and owned by the result.
    ``tile_labels`` (not the paper's protocol; for models trained with it) writes each tile's
    ``(row,column)`` before it in the prompt.
    """
    owns = not isinstance(raster_or_path, Raster)
    raster = open_raster(raster_or_path, bands=bands) if owns else raster_or_path
    try:
        plan = plan_grid(raster.width, raster.height, tile_size, max_tiles)
        infos = plan_tiles(raster, plan)
        thumbnail = Image.fromarray(raster.read_thumbnail(tile_size))
        box = raster.thumbnail_geometry(tile_size)
    except BaseException:
        if owns:
            raster.close()
        raise
    return TiledImage(raster, plan, infos, thumbnail, box, owns_raster=owns, tile_labels=bool(tile_labels))
