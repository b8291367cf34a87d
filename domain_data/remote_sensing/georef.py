"""Answers about a tiled raster -> pixel geometry -> GeoJSON.

Tile references are read from free text. Rows and columns are counted from 1 in text (as the app and
the prompts speak to users: "row 1, column 1" is the top-left tile); the Python API returns 0-based
``(row, col)`` indexes, like :class:`~domain_data.remote_sensing.tiling.TileInfo`. Recognised forms
(case-insensitive, numbers as digits or the words one..twenty):

* ``row 3, column 5`` / ``row 3 col 5`` / ``row 3 and column 5`` / ``column 5, row 3``;
* ``(3, 5)`` and ``r3c5`` (row first);
* ``row 3`` alone when the grid has one column, ``column 5`` alone when it has one row.

References outside the grid are not guessed at: they are listed under ``unresolved``.

FIT-RS boxes, ``<rbox>({<cx><cy><w><h>|<angle>}, ...)</rbox>``: centre, width and height normalised
0-100 to the image they refer to, angle in degrees. The width axis points along ``(cos a, sin a)``
in image pixels (y down), as in FIT-RS's OpenCV/mmrotate ``oc`` boxes. The 4-point form
``{<x1,y1><x2,y2><x3,y3><x4,y4>}`` is read too. A box refers to the tile named by the closest tile
reference before it; with none before it, to the only tile referenced in the answer, if exactly one
is; otherwise to the thumbnail (the whole image, padded square).

Output: a GeoJSON FeatureCollection. Georeferenced rasters give lon/lat (EPSG:4326) polygons, tile
edges densified so projected curvature is kept; other rasters give source pixel coordinates
(x right, y down) and say so in ``coordinate_system`` and ``note``. Rings are closed and
counter-clockwise in the coordinates written (RFC 7946). Rings crossing the antimeridian are not
split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rasterio.warp import transform as warp_transform

from domain_data.remote_sensing.tiling import TiledImage, TileInfo

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUM = r"(\d+|" + "|".join(sorted(_NUMBER_WORDS[1:], key=len, reverse=True)) + r")"
_SEP = r"\s*(?:,|;|/|&|and)?\s*(?:in\s+)?(?:the\s+)?"
_ROW = r"row\s*(?:#|no\.?\s*|number\s*)?"
_COL = r"col(?:umn)?\.?\s*(?:#|no\.?\s*|number\s*)?"
_PAIR_PATTERNS: tuple[tuple[re.Pattern, bool], ...] = (
    (re.compile(rf"\b{_ROW}{_NUM}{_SEP}{_COL}{_NUM}\b", re.IGNORECASE), False),
    (re.compile(rf"\b{_COL}{_NUM}{_SEP}{_ROW}{_NUM}\b", re.IGNORECASE), True),
    (re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)"), False),
    (re.compile(r"\br(\d+)\s*c(\d+)\b", re.IGNORECASE), False),
)
_ROW_ONLY = re.compile(rf"\b{_ROW}{_NUM}\b", re.IGNORECASE)
_COL_ONLY = re.compile(rf"\b{_COL}{_NUM}\b", re.IGNORECASE)
_RBOX = re.compile(r"<rbox>(.*?)</rbox>", re.IGNORECASE | re.DOTALL)
_FLOAT = r"[-+]?\d+(?:\.\d+)?"
_RBOX_ITEM = re.compile(r"\{(.*?)\}", re.DOTALL)
_ANGLE_BOX = re.compile(rf"^\s*<\s*({_FLOAT})\s*>\s*<\s*({_FLOAT})\s*>\s*<\s*({_FLOAT})\s*>\s*<\s*({_FLOAT})\s*>"
                        rf"\s*\|\s*<\s*({_FLOAT})\s*>\s*$")
_POINT = re.compile(rf"<\s*({_FLOAT})\s*,\s*({_FLOAT})\s*>")
TILE_EDGE_POINTS = 8
# Rows and columns in user-facing text (prompts, answers, labels, GeoJSON properties) count from 1.
TILE_INDEX_BASE = 1


def _number(text: str) -> int:
    return int(text) if text.isdigit() else _NUMBER_WORDS.index(text.lower())


@dataclass(frozen=True)
class TileReference:
    """A tile named in an answer: 0-based ``row``, ``col``; ``start``/``end`` locate ``text``."""

    row: int
    col: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class RotatedBox:
    """A FIT-RS box, normalised 0-100: ``corners`` are four (x, y) points in that 0-100 frame."""

    corners: tuple[tuple[float, float], ...]
    params: dict
    start: int
    end: int
    text: str


def _overlaps(start: int, end: int, taken: Sequence[tuple[int, int]]) -> bool:
    return any(start < t_end and t_start < end for t_start, t_end in taken)


def find_tile_references(answer: str, grid: tuple[int, int]) -> tuple[list[TileReference], list[str]]:
    """Tile references in ``answer`` (in text order) and the texts that name no tile of ``grid``."""
    rows, cols = grid
    taken: list[tuple[int, int]] = [m.span() for m in _RBOX.finditer(answer)]
    found: list[TileReference] = []
    unresolved: list[str] = []

    def accept(match: re.Match, row: int, col: int) -> None:
        taken.append(match.span())
        row, col = row - TILE_INDEX_BASE, col - TILE_INDEX_BASE
        if 0 <= row < rows and 0 <= col < cols:
            found.append(TileReference(row, col, match.start(), match.end(), match.group(0)))
        else:
            unresolved.append(f"{match.group(0)!r} is outside the {rows} x {cols} grid")

    for pattern, column_first in _PAIR_PATTERNS:
        for match in pattern.finditer(answer):
            if _overlaps(*match.span(), taken):
                continue
            first, second = _number(match.group(1)), _number(match.group(2))
            accept(match, *((second, first) if column_first else (first, second)))
    singles = ((_ROW_ONLY, cols == 1, True), (_COL_ONLY, rows == 1, False))
    for pattern, unambiguous, is_row in singles:
        for match in pattern.finditer(answer):
            if _overlaps(*match.span(), taken):
                continue
            if not unambiguous:
                unresolved.append(f"{match.group(0)!r} names a {'row' if is_row else 'column'} but no "
                                  f"{'column' if is_row else 'row'} of the {rows} x {cols} grid")
                taken.append(match.span())
                continue
            value = _number(match.group(1))
            accept(match, *((value, 1) if is_row else (1, value)))
    found.sort(key=lambda ref: ref.start)
    return found, unresolved


def referenced_tiles(answer: str, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """0-based (row, col) of every tile named in ``answer`` (1-based in the text), first mention order."""
    seen: list[tuple[int, int]] = []
    for ref in find_tile_references(answer, grid)[0]:
        if (ref.row, ref.col) not in seen:
            seen.append((ref.row, ref.col))
    return seen


def _angle_box_corners(cx: float, cy: float, w: float, h: float, angle: float) -> tuple[tuple[float, float], ...]:
    a = math.radians(angle)
    wx, wy = w / 2 * math.cos(a), w / 2 * math.sin(a)
    hx, hy = -h / 2 * math.sin(a), h / 2 * math.cos(a)
    return ((cx - wx - hx, cy - wy - hy), (cx + wx - hx, cy + wy - hy),
            (cx + wx + hx, cy + wy + hy), (cx - wx + hx, cy - wy + hy))


def parse_rboxes(answer: str) -> tuple[list[RotatedBox], list[str]]:
    """FIT-RS boxes in ``answer`` (text order) and the box texts that could not be read."""
    boxes: list[RotatedBox] = []
    unreadable: list[str] = []
    for block in _RBOX.finditer(answer):
        inner = block.group(1)
        items = list(_RBOX_ITEM.finditer(inner)) or [None]
        for item in items:
            text = item.group(1) if item else inner.strip("() ")
            angle_box = _ANGLE_BOX.match(text)
            points = _POINT.findall(text)
            if angle_box:
                cx, cy, w, h, angle = (float(v) for v in angle_box.groups())
                corners = _angle_box_corners(cx, cy, w, h, angle)
                params = {"cx": cx, "cy": cy, "w": w, "h": h, "angle": angle}
            elif len(points) == 4:
                corners = tuple((float(x), float(y)) for x, y in points)
                params = {"points": [list(p) for p in corners]}
            else:
                unreadable.append(f"box {text!r} is neither {{<cx><cy><w><h>|<angle>}} nor four <x,y> points")
                continue
            boxes.append(RotatedBox(corners, params, block.start(), block.end(), block.group(0)))
    return boxes, unreadable


def _owner(box: RotatedBox, refs: Sequence[TileReference]) -> TileReference | None:
    before = [ref for ref in refs if ref.end <= box.start]
    if before:
        return before[-1]
    distinct = {(ref.row, ref.col) for ref in refs}
    return refs[0] if len(distinct) == 1 else None


def _ccw(ring: list[list[float]]) -> list[list[float]]:
    """Close ``ring`` and make it counter-clockwise (positive shoelace area) in its own coordinates."""
    if ring[0] != ring[-1]:
        ring = ring + [ring[0]]
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]))
    return ring if area > 0 else ring[::-1]


def _densify(corners: Sequence[tuple[float, float]], points_per_edge: int) -> list[tuple[float, float]]:
    ring = []
    for (x0, y0), (x1, y1) in zip(corners, list(corners[1:]) + [corners[0]]):
        ring.extend((x0 + (x1 - x0) * k / points_per_edge, y0 + (y1 - y0) * k / points_per_edge)
                    for k in range(points_per_edge))
    return ring


def tile_pixel_corners(info: TileInfo) -> list[tuple[float, float]]:
    """The tile's source pixel window as a ring of 4 corners (source pixel coordinates)."""
    w = info.window
    x0, y0, x1, y1 = w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height
    return [(float(x0), float(y0)), (float(x0), float(y1)), (float(x1), float(y1)), (float(x1), float(y0))]


def _pixels_to_output(tiled: TiledImage, pixels: Sequence[tuple[float, float]]) -> list[list[float]]:
    if not tiled.georeferenced:
        return _ccw([[round(x, 3), round(y, 3)] for x, y in pixels])
    xs, ys = zip(*(tiled.source_to_crs(x, y) for x, y in pixels))
    lons, lats = warp_transform(tiled.raster.crs, "EPSG:4326", list(xs), list(ys))
    return _ccw([[float(lon), float(lat)] for lon, lat in zip(lons, lats)])


def _feature(ring: list[list[float]], properties: dict) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": properties}


def answer_to_geojson(answer: str, tiled: TiledImage) -> dict:
    """A FeatureCollection with one polygon per tile reference and per FIT-RS box in ``answer``."""
    refs, unresolved = find_tile_references(answer, tiled.grid)
    boxes, unreadable = parse_rboxes(answer)
    crs_text = tiled.raster.crs_text
    common = {"source_crs": crs_text, "scale": tiled.scale, "answer": answer}
    features = []
    for ref in refs:
        info = tiled.tile_at(ref.row, ref.col)
        ring = _pixels_to_output(tiled, _densify(tile_pixel_corners(info), TILE_EDGE_POINTS))
        features.append(_feature(ring, {"kind": "tile", "tile_row": ref.row + TILE_INDEX_BASE,
                                        "tile_col": ref.col + TILE_INDEX_BASE,
                                        "reference": ref.text, "pixel_window": info.pixel_window(), **common}))
    size = tiled.tile_size
    for box in boxes:
        owner = _owner(box, refs)
        tile_units = [(x / 100.0 * size, y / 100.0 * size) for x, y in box.corners]
        if owner is not None:
            info = tiled.tile_at(owner.row, owner.col)
            pixels = [info.tile_to_source(u, v) for u, v in tile_units]
            where = {"relative_to": "tile", "tile_row": owner.row + TILE_INDEX_BASE,
                     "tile_col": owner.col + TILE_INDEX_BASE,
                     "pixel_window": info.pixel_window()}
        else:
            pixels = [tiled.thumbnail_to_source(u, v) for u, v in tile_units]
            where = {"relative_to": "thumbnail", "tile_row": None, "tile_col": None,
                     "pixel_window": {"col_off": 0, "row_off": 0, "width": tiled.plan.width,
                                      "height": tiled.plan.height}}
        ring = _pixels_to_output(tiled, pixels)
        features.append(_feature(ring, {"kind": "rbox", "reference": box.text, "rbox": box.params,
                                        "pixel_polygon": [[round(x, 3), round(y, 3)] for x, y in pixels],
                                        **where, **common}))
    if tiled.georeferenced:
        system, note = "EPSG:4326 (lon, lat)", f"source CRS {crs_text}"
    else:
        system = "pixel (x right, y down) of the source image"
        note = f"{tiled.raster.georeference_note}; coordinates are source pixels, not lon/lat"
    return {"type": "FeatureCollection", "features": features, "georeferenced": tiled.georeferenced,
            "coordinate_system": system, "note": note, "grid": list(tiled.grid),
            "tile_numbering": "rows and columns counted from 1, top-left tile is row 1, column 1",
            "unresolved": unresolved + unreadable}
