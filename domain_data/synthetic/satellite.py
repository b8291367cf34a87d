"""Seeded satellite scenes (fields, a river, roads) with countable objects placed in known grid tiles.

Tile geometry (the rule of the sub-image tiler, ``domain_data.remote_sensing``): an image of
``height x width`` pixels is padded **centred** to the next multiple of ``tile_size`` in each
dimension (``padded = ceil(n / tile_size) * tile_size``; ``pad_before = (padded - n) // 2``, the odd
pixel, if any, goes after), then cut into ``rows x cols`` tiles listed row by row from the top-left.
Rows and columns are **1-based** in every user-facing text ("row 2, column 3"). When the tiler
downsamples by an integer ``scale`` to fit a tile budget, the same rule applies to the level image of
``ceil(n / scale)`` pixels and source pixel ``p`` is level pixel ``p // scale``. :func:`tile_of`
replicates that rule for a source pixel; objects are placed so that each lies wholly inside one tile
(4 px clear of its borders) of the ``tile_size`` the scene was made for, so ``tile_of`` of any of its
pixels agrees. At another tile size an object may straddle tiles: :meth:`SceneObject.tiles` tells.

Scene content: classes ``field`` (three crop colours), ``soil``, ``water`` (a meandering river),
``road`` (straight roads, bridges over the river); objects ``ship`` (rotated hulls on water),
``storage tank`` (round tanks with a rim and shadow, on land) and ``building`` (rectangular roofs
with a shadow, on land). By default each present object kind is clustered in one tile (a harbour, a
tank farm, a hamlet), which is what the "which row / column / tile" questions ask about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from domain_data.synthetic.errors import SyntheticDataError

OBJECT_KINDS: tuple[str, ...] = ("ship", "storage tank", "building")
PLURALS = {"ship": "ships", "storage tank": "storage tanks", "building": "buildings"}
CLASSES: dict[str, int] = {"field": 0, "soil": 1, "water": 2, "road": 3, "object": 4}
TILE_MARGIN = 4
MAX_SIDE = 20000

_FIELD_COLOURS = np.array(
    [[86, 125, 60], [150, 150, 80], [60, 95, 50], [170, 140, 100], [120, 140, 70]], dtype=np.float32
)
_WATER, _ROAD = np.array([35, 60, 85], np.float32), np.array([128, 126, 122], np.float32)


@dataclass(frozen=True)
class TileGrid:
    """The tiler's grid for an image: centred padding to a multiple of ``tile_size``."""

    height: int
    width: int
    tile_size: int
    rows: int
    cols: int
    pad_top: int
    pad_left: int

    def window(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Source pixel window ``(x0, y0, x1, y1)`` (end-exclusive, clipped) of 1-based tile (row, col)."""
        if not (1 <= row <= self.rows and 1 <= col <= self.cols):
            raise SyntheticDataError(
                f"tile (row {row}, column {col}) is outside the {self.rows}x{self.cols} grid"
            )
        y0 = (row - 1) * self.tile_size - self.pad_top
        x0 = (col - 1) * self.tile_size - self.pad_left
        return (
            max(x0, 0),
            max(y0, 0),
            min(x0 + self.tile_size, self.width),
            min(y0 + self.tile_size, self.height),
        )


def tile_grid(height: int, width: int, tile_size: int = 336) -> TileGrid:
    """Grid shape and centred padding for an image of ``height x width`` pixels."""
    if height < 1 or width < 1 or tile_size < 1:
        raise SyntheticDataError(f"image {height}x{width} and tile size {tile_size} must be positive")
    rows, cols = -(-height // tile_size), -(-width // tile_size)
    pad_top = (rows * tile_size - height) // 2
    pad_left = (cols * tile_size - width) // 2
    return TileGrid(height, width, tile_size, rows, cols, pad_top, pad_left)


def tile_of(
    x: float, y: float, height: int, width: int, tile_size: int = 336, scale: int = 1
) -> tuple[int, int]:
    """1-based (row, col) of the tile holding source pixel (x, y) (column, row) of a ``height x width``
    image, for the tiler's grid at integer downsampling ``scale`` (1 = full resolution)."""
    if not (0 <= x < width and 0 <= y < height):
        raise SyntheticDataError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    if scale < 1:
        raise SyntheticDataError(f"scale must be an integer >= 1, got {scale}")
    grid = tile_grid(-(-height // scale), -(-width // scale), tile_size)
    level_x, level_y = int(x) // scale, int(y) // scale
    return (level_y + grid.pad_top) // tile_size + 1, (level_x + grid.pad_left) // tile_size + 1


@dataclass(frozen=True)
class SceneObject:
    """One object: centre (x, y) in source pixels, size, angle, and the tight pixel bounding box
    (end-exclusive) of everything painted for it, shadow included."""

    kind: str
    cx: float
    cy: float
    length: float
    width: float
    angle_deg: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1

    def tile(self, height: int, width: int, tile_size: int = 336) -> tuple[int, int]:
        """1-based (row, col) of the tile holding the object's centre."""
        return tile_of(self.cx, self.cy, height, width, tile_size)

    def tiles(self, height: int, width: int, tile_size: int = 336) -> set[tuple[int, int]]:
        """Every tile the bounding box touches (one tile for the size the scene was made for)."""
        x0, y0, x1, y1 = self.bbox
        corners = [(x, y) for x in (x0, x1 - 1) for y in (y0, y1 - 1)]
        return {tile_of(x, y, height, width, tile_size) for x, y in corners}

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cx": round(self.cx, 2),
            "cy": round(self.cy, 2),
            "length": round(self.length, 2),
            "width": round(self.width, 2),
            "angle_deg": round(self.angle_deg, 1),
            "bbox": list(self.bbox),
        }


@dataclass
class Scene:
    """A seeded scene: ``image`` (H, W, 3) uint8 or uint16 RGB, ``classes`` (H, W) uint8, objects."""

    seed: int
    image: np.ndarray
    classes: np.ndarray
    objects: list[SceneObject]
    tile_size: int

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def grid(self, tile_size: int | None = None) -> TileGrid:
        return tile_grid(self.height, self.width, tile_size or self.tile_size)

    def count(self, kind: str) -> int:
        _check_kind(kind)
        return sum(1 for o in self.objects if o.kind == kind)

    def tiles_with(self, kind: str, tile_size: int | None = None) -> list[tuple[int, int]]:
        """Sorted 1-based (row, col) tiles holding at least one ``kind`` object (by its centre)."""
        size = tile_size or self.tile_size
        return sorted({o.tile(self.height, self.width, size) for o in self.objects if o.kind == kind})

    def ground_truth(self, tile_size: int | None = None) -> dict[str, Any]:
        size = tile_size or self.tile_size
        grid = self.grid(size)
        return {
            "seed": self.seed,
            "height": self.height,
            "width": self.width,
            "dtype": str(self.image.dtype),
            "tile_size": size,
            "grid": {
                "rows": grid.rows,
                "cols": grid.cols,
                "pad_top": grid.pad_top,
                "pad_left": grid.pad_left,
            },
            "counts": {kind: self.count(kind) for kind in OBJECT_KINDS},
            "objects": [
                {**o.to_json(), "tile": list(o.tile(self.height, self.width, size))} for o in self.objects
            ],
        }


def _check_kind(kind: str) -> None:
    if kind not in OBJECT_KINDS:
        raise SyntheticDataError(f"object kind {kind!r} is unknown: use one of {', '.join(OBJECT_KINDS)}")


# ------------------------------------------------------------------------------------------ background
def _smooth_1d(n: int, rng: np.random.Generator, amplitude: float, wavelength: float) -> np.ndarray:
    """A smooth random curve of ``n`` samples: a sum of three sinusoids."""
    pos = np.arange(n, dtype=np.float32)
    curve = np.zeros(n, dtype=np.float32)
    for k in range(1, 4):
        phase = rng.uniform(0, 2 * np.pi)
        curve += amplitude / k * np.sin(2 * np.pi * k * pos / wavelength + phase).astype(np.float32)
    return curve


def _field_cells(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel flat index (H, W) int32 of a field cell with wavy borders, and the cells' colours."""
    cell = int(rng.integers(90, 180))
    jitter_y = _smooth_1d(width, rng, cell * 0.25, width / 1.5)  # wavy field borders
    jitter_x = _smooth_1d(height, rng, cell * 0.25, height / 1.5)
    n_cells_r, n_cells_c = height // cell + 10, width // cell + 10
    rows_idx = (np.arange(height, dtype=np.float32)[:, None] + jitter_y[None, :]) // cell + 4  # (H, W)
    cols_idx = (np.arange(width, dtype=np.float32)[None, :] + jitter_x[:, None]) // cell + 4  # (H, W)
    flat = rows_idx.astype(np.int32) * n_cells_c + cols_idx.astype(np.int32)
    patch_type = rng.integers(0, len(_FIELD_COLOURS), size=n_cells_r * n_cells_c)
    patch_shift = rng.uniform(-12, 12, size=(n_cells_r * n_cells_c, 3)).astype(np.float32)
    return flat, np.stack(
        [patch_type.astype(np.float32), *(_FIELD_COLOURS[patch_type] + patch_shift).T], axis=1
    )


def _background(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class map (H, W) and a per-pixel colour (H, W, 3) float32 of fields, soil, river and roads."""
    flat, cells = _field_cells(height, width, rng)  # cells: (n, 4) = type, R, G, B
    colour = np.take(cells[:, 1:], flat, axis=0)  # (H, W, 3)
    classes = np.where(np.take(cells[:, 0], flat) == 3, CLASSES["soil"], CLASSES["field"]).astype(np.uint8)
    del flat
    # crop rows: faint diagonal stripes sin(x/3 + y/6), written as two separable products
    x, y = np.arange(width, dtype=np.float32) / 3, np.arange(height, dtype=np.float32) / 6
    stripes = np.outer(np.cos(y), np.sin(x))
    stripes += np.outer(np.sin(y), np.cos(x))
    colour += (6.0 * stripes)[:, :, None]
    del stripes

    # a river meandering across the long axis, one run of pixels per position along it
    horizontal = width >= height
    along, across = (width, height) if horizontal else (height, width)
    centre = across * rng.uniform(0.3, 0.7) + _smooth_1d(along, rng, across * 0.12, along * 0.9)
    half_width = max(across * rng.uniform(0.06, 0.1), 20.0) + _smooth_1d(along, rng, across * 0.01, along / 2)
    water_colour = _WATER + rng.normal(0, 3, size=3).astype(np.float32)
    for i in range(along):
        lo = max(int(np.ceil(centre[i] - half_width[i])), 0)
        hi = min(int(np.floor(centre[i] + half_width[i])) + 1, across)
        run = (slice(lo, hi), i) if horizontal else (i, slice(lo, hi))
        classes[run] = CLASSES["water"]
        colour[run] = water_colour

    # straight roads, one roughly parallel to each axis (bridges cross the river)
    for axis in (0, 1):
        half = rng.uniform(3, 5)
        offset, slope = rng.uniform(0.15, 0.85), rng.uniform(-0.15, 0.15)
        length, extent = (width, height) if axis == 0 else (height, width)
        for i in range(length):
            mid = offset * extent + slope * (i - length / 2)
            lo, hi = max(int(np.ceil(mid - half)), 0), min(int(np.floor(mid + half)) + 1, extent)
            run = (slice(lo, hi), i) if axis == 0 else (i, slice(lo, hi))
            classes[run] = CLASSES["road"]
            colour[run] = _ROAD
    return classes, colour


# --------------------------------------------------------------------------------------------- objects
def _rotated_rect_mask(length: float, width: float, angle_deg: float, half: int) -> np.ndarray:
    """A rotated rectangle centred in a (2*half+1)^2 patch."""
    coords = np.arange(-half, half + 1, dtype=np.float32)
    dy, dx = coords[:, None], coords[None, :]
    a = math.radians(angle_deg)
    along = dx * math.cos(a) + dy * math.sin(a)
    across = -dx * math.sin(a) + dy * math.cos(a)
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)


def _hull_mask(length: float, width: float, angle_deg: float, half: int) -> np.ndarray:
    """A ship hull: a rotated rectangle whose ends taper to a point (bow and stern)."""
    coords = np.arange(-half, half + 1, dtype=np.float32)
    dy, dx = coords[:, None], coords[None, :]
    a = math.radians(angle_deg)
    along = np.abs(dx * math.cos(a) + dy * math.sin(a))
    across = np.abs(-dx * math.sin(a) + dy * math.cos(a))
    taper_start = length / 2 - width
    allowed_half_width = np.where(along <= taper_start, width / 2, (width / 2) * (length / 2 - along) / width)
    return (along <= length / 2) & (across <= allowed_half_width)


def _disc(radius: float, half: int, shift: int = 0) -> np.ndarray:
    coords = np.arange(-half, half + 1, dtype=np.float32)
    return (coords[:, None] - shift) ** 2 + (coords[None, :] - shift) ** 2 <= radius**2


BUILDING_SHADOW = (3, 3)  # px (down, right) a building's shadow is offset from its roof
TANK_SHADOW = 2  # px a storage tank's shadow disc is offset down and right


def footprint_half(kind: str, length: float, width: float) -> int:
    """Half side of the square patch an object of this size is painted in (the patch is ``2 * half + 1``)."""
    _check_kind(kind)
    if kind == "ship":
        return int(math.ceil(length / 2)) + 2
    if kind == "storage tank":
        return int(math.ceil(length / 2)) + 4
    return int(math.ceil(math.hypot(length, width) / 2)) + 4


def object_footprint(kind: str, length: float, width: float, angle_deg: float) -> np.ndarray:
    """Boolean ``(2 * half + 1)^2`` patch (:func:`footprint_half`), centred on the object: every pixel
    painted for it, shadow included -- the scene's ``object`` class there. From a scene's ground truth
    (``kind``, ``length``, ``width``, ``angle_deg``; a storage tank's length is its diameter)."""
    half = footprint_half(kind, length, width)
    if kind == "ship":
        return _hull_mask(length, width, angle_deg, half)
    if kind == "storage tank":
        radius = length / 2
        return _disc(radius, half) | _disc(radius, half, shift=TANK_SHADOW)
    roof = _rotated_rect_mask(length, width, angle_deg, half)
    return roof | np.roll(roof, BUILDING_SHADOW, axis=(0, 1))


def objects_mask(objects: Sequence[dict[str, Any]], kind: str, origin: tuple[int, int],
                 shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` ``(height, width)`` mask of every ``kind`` object's footprint
    (:func:`object_footprint`) in the window whose top-left is source pixel ``origin`` ``(x, y)``; parts
    outside the window (or the window outside the scene: padding) are dropped. ``objects`` are ground-truth
    records (``SceneObject.to_json``)."""
    _check_kind(kind)
    mask = np.zeros(shape, dtype=bool)
    for item in objects:
        if item["kind"] != kind:
            continue
        patch = object_footprint(kind, float(item["length"]), float(item["width"]), float(item["angle_deg"]))
        half = (patch.shape[0] - 1) // 2
        top, left = int(round(item["cy"])) - half - origin[1], int(round(item["cx"])) - half - origin[0]
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + patch.shape[0], shape[0]), min(left + patch.shape[1], shape[1])
        if y0 < y1 and x0 < x1:
            mask[y0:y1, x0:x1] |= patch[y0 - top : y1 - top, x0 - left : x1 - left]
    return mask


def _object_shape(kind: str, rng: np.random.Generator, scale: float) -> dict[str, Any]:
    """Size, angle and the painted layers (boolean masks in one square patch); ``mask`` = footprint."""
    if kind == "ship":
        length, width, angle = rng.uniform(24, 44) * scale, rng.uniform(7, 11) * scale, rng.uniform(0, 180)
        half = footprint_half(kind, length, width)
        hull = _hull_mask(length, width, angle, half)
        deck = _rotated_rect_mask(length * 0.4, width * 0.45, angle, half)
        layers = [(hull, (225, 225, 220)), (deck, (150, 150, 155))]
        return {
            "mask": hull,
            "half": half,
            "length": length,
            "width": width,
            "angle": angle,
            "layers": layers,
        }
    if kind == "storage tank":
        radius = rng.uniform(9, 16) * scale
        half = footprint_half(kind, 2 * radius, 2 * radius)
        tank, shadow = _disc(radius, half), _disc(radius, half, shift=TANK_SHADOW)
        rim = tank & ~_disc(radius * 0.75, half)
        layers = [(shadow, (45, 45, 45)), (tank, (208, 208, 204)), (rim, (170, 170, 168))]
        size = 2 * radius
        return {
            "mask": tank | shadow,
            "half": half,
            "length": size,
            "width": size,
            "angle": 0.0,
            "layers": layers,
        }
    length, width = rng.uniform(18, 38) * scale, rng.uniform(14, 30) * scale
    angle = float(rng.choice([0.0, 90.0])) + rng.uniform(-8, 8)
    half = footprint_half(kind, length, width)
    roof = _rotated_rect_mask(length, width, angle, half)
    shadow = np.roll(roof, BUILDING_SHADOW, axis=(0, 1))
    roof_colours = ((170, 70, 55), (140, 140, 145), (95, 90, 85), (200, 190, 170))
    roof_colour = roof_colours[int(rng.integers(0, len(roof_colours)))]
    layers = [(shadow, (50, 50, 48)), (roof, roof_colour)]
    return {
        "mask": roof | shadow,
        "half": half,
        "length": length,
        "width": width,
        "angle": angle,
        "layers": layers,
    }


def _paint_object(
    colour: np.ndarray, shape: dict[str, Any], cx: int, cy: int, rng: np.random.Generator
) -> None:
    half = shape["half"]
    patch = colour[cy - half : cy + half + 1, cx - half : cx + half + 1]
    brightness = rng.uniform(-15, 10)
    for mask, rgb in shape["layers"]:
        patch[mask] = np.asarray(rgb, dtype=np.float32) + brightness


def _allowed_classes(kind: str) -> tuple[int, ...]:
    return (CLASSES["water"],) if kind == "ship" else (CLASSES["field"], CLASSES["soil"])


def _choose_tile(kind: str, classes: np.ndarray, grid: TileGrid, rng: np.random.Generator) -> tuple[int, int]:
    """A tile with enough room of the allowed class (water for ships, land otherwise)."""
    allowed = np.isin(classes, _allowed_classes(kind))
    candidates, weights = [], []
    for row in range(1, grid.rows + 1):
        for col in range(1, grid.cols + 1):
            x0, y0, x1, y1 = grid.window(row, col)
            share = float(allowed[y0:y1, x0:x1].mean()) if x1 > x0 and y1 > y0 else 0.0
            if share > 0.08 and min(x1 - x0, y1 - y0) > 60:
                candidates.append((row, col))
                weights.append(share)
    if not candidates:
        raise SyntheticDataError(f"no tile of the {grid.rows}x{grid.cols} grid has room for a {kind}")
    index = int(rng.choice(len(candidates), p=np.asarray(weights) / np.sum(weights)))
    return candidates[index]


def _place_in_tile(kind, tile, classes, colour, grid, rng, scale) -> SceneObject:
    x0, y0, x1, y1 = grid.window(*tile)
    allowed = _allowed_classes(kind)
    for _ in range(400):
        shape = _object_shape(kind, rng, scale)
        half = shape["half"]
        lo_x, hi_x = x0 + TILE_MARGIN + half, x1 - TILE_MARGIN - half
        lo_y, hi_y = y0 + TILE_MARGIN + half, y1 - TILE_MARGIN - half
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        cx, cy = int(rng.integers(lo_x, hi_x)), int(rng.integers(lo_y, hi_y))
        box = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
        region = classes[box]
        # the whole footprint must be free ground of the right class, 3 px clear of other objects
        if not np.all(np.isin(region[shape["mask"]], allowed)):
            continue
        if _touches_object(classes, cx, cy, half + 3):
            continue
        rows, cols = np.nonzero(shape["mask"])
        _paint_object(colour, shape, cx, cy, rng)
        region[shape["mask"]] = CLASSES["object"]
        return SceneObject(
            kind=kind,
            cx=float(cx),
            cy=float(cy),
            length=float(shape["length"]),
            width=float(shape["width"]),
            angle_deg=float(shape["angle"]),
            bbox=(  # tight box of the painted footprint (shadow included)
                cx - half + int(cols.min()),
                cy - half + int(rows.min()),
                cx - half + int(cols.max()) + 1,
                cy - half + int(rows.max()) + 1,
            ),
        )
    raise SyntheticDataError(
        f"could not place a {kind} in tile (row {tile[0]}, column {tile[1]}): tile too crowded"
    )


def _touches_object(classes: np.ndarray, cx: int, cy: int, half: int) -> bool:
    box = classes[max(cy - half, 0) : cy + half + 1, max(cx - half, 0) : cx + half + 1]
    return bool(np.any(box == CLASSES["object"]))


class _NoRoom(Exception):
    def __init__(self, message: str, placed: list[SceneObject]) -> None:
        super().__init__(message)
        self.placed = placed


def _place_kind(kind, spec, classes, colour, grid, rng, scale) -> list[SceneObject]:
    """Place ``spec['count']`` objects of ``kind`` (one tile, a given tile, or spread); raise _NoRoom."""
    placed: list[SceneObject] = []
    try:
        tile = tuple(spec["tile"]) if "tile" in spec else None
        for _ in range(int(spec.get("count", 0))):
            if tile is None or spec.get("spread"):
                tile = _choose_tile(kind, classes, grid, rng)
            placed.append(_place_in_tile(kind, tile, classes, colour, grid, rng, scale))
    except SyntheticDataError as error:
        raise _NoRoom(str(error), placed) from None
    return placed


def _normalise_objects(
    objects: Mapping[str, Any] | None, rng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    if objects is None:  # each kind absent with p 0.3, else 1-5 objects
        return {k: {"count": int(rng.integers(1, 6)) if rng.random() > 0.3 else 0} for k in OBJECT_KINDS}
    result = {}
    for kind, spec in objects.items():
        _check_kind(kind)
        spec = {"count": spec} if isinstance(spec, int) else dict(spec)
        if not 0 <= int(spec.get("count", 0)) <= 40:
            raise SyntheticDataError(f"count of {kind} must be 0-40, got {spec.get('count')}")
        result[kind] = spec
    return result


def make_scene(
    seed: int,
    height: int = 1008,
    width: int = 1344,
    objects: Mapping[str, Any] | None = None,
    dtype: str = "uint8",
    tile_size: int = 336,
    object_scale: float = 1.0,
) -> Scene:
    """A seeded RGB scene with objects in known tiles of the ``tile_size`` grid.

    ``objects``: ``None`` draws 0-5 of each kind (fewer when a small scene has no room: the objects
    list and the counts are what was placed); otherwise ``{kind: count}`` or ``{kind: {"count": n,
    "tile": (row, col), "spread": bool}}`` (``tile`` 1-based; ``spread`` scatters the objects over
    random suitable tiles instead of clustering them in one). ``dtype`` ``uint16`` gives 12-bit sensor
    values (0-4095, not stretched) as a 16-bit product would.
    """
    if not (64 <= height <= MAX_SIDE and 64 <= width <= MAX_SIDE):
        raise SyntheticDataError(f"scene size {height}x{width} must be 64-{MAX_SIDE} pixels per side")
    if dtype not in ("uint8", "uint16"):
        raise SyntheticDataError(f"dtype {dtype!r} must be 'uint8' or 'uint16'")
    rng = np.random.default_rng(seed)
    wanted = _normalise_objects(objects, rng)
    classes, colour = _background(height, width, rng)
    grid = tile_grid(height, width, tile_size)
    placed: list[SceneObject] = []
    for kind in OBJECT_KINDS:
        spec = wanted.get(kind, {"count": 0})
        try:
            placed += _place_kind(kind, spec, classes, colour, grid, rng, object_scale)
        except _NoRoom as error:
            if objects is not None:  # asked for explicitly: say so; a random draw keeps what fitted
                raise SyntheticDataError(str(error)) from None
            placed += error.placed
    image = _finish_image(colour, rng, dtype)
    return Scene(seed=seed, image=image, classes=classes, objects=placed, tile_size=tile_size)


def _finish_image(colour: np.ndarray, rng: np.random.Generator, dtype: str) -> np.ndarray:
    noise = rng.integers(-6, 7, size=colour.shape, dtype=np.int8)
    colour += noise
    if dtype == "uint16":
        return np.clip(colour * 14.0 + 60.0, 0, 4095).astype(np.uint16)
    return np.clip(colour, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- GeoTIFF
def write_geotiff(
    scene: Scene,
    path: str | Path,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] | None = None,
    pixel_size: float | None = None,
    nodata: float | None = None,
    tiled: bool = True,
    block_size: int = 256,
    compress: str | None = "deflate",
) -> Path:
    """Write the scene as a 3-band GeoTIFF (band order R, G, B).

    ``origin`` is the (x, y) CRS coordinate of the top-left corner; ``pixel_size`` in CRS units.
    Defaults: a projected CRS gets 0.5 m pixels at (500000, 4650000) (EPSG:32633 = UTM 33N, central
    Italy); a geographic CRS gets 5e-6 degree pixels at (14.0, 42.0).
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    path = Path(path)
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception as error:
        raise SyntheticDataError(f"CRS {crs!r} for {path} is not understood: {error}") from error
    if origin is None:
        origin = (14.0, 42.0) if crs_obj.is_geographic else (500000.0, 4650000.0)
    if pixel_size is None:
        pixel_size = 5e-6 if crs_obj.is_geographic else 0.5
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": scene.height,
        "width": scene.width,
        "count": 3,
        "dtype": str(scene.image.dtype),
        "crs": crs_obj,
        "transform": from_origin(origin[0], origin[1], pixel_size, pixel_size),
        "photometric": "RGB" if scene.image.dtype == np.uint8 else "MINISBLACK",
        "interleave": "pixel",
    }
    if tiled:
        profile.update(tiled=True, blockxsize=block_size, blockysize=block_size)
    if compress:
        profile["compress"] = compress
    if nodata is not None:
        profile["nodata"] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(scene.image, -1, 0))  # (H, W, 3) -> (3, H, W)
        dst.colorinterp = [
            rasterio.enums.ColorInterp.red,
            rasterio.enums.ColorInterp.green,
            rasterio.enums.ColorInterp.blue,
        ]
    return path
