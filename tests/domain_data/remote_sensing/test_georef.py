"""Tile references and FIT-RS boxes in answers -> pixel geometry -> valid lon/lat GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rasterio.warp import transform as warp_transform

from domain_data.remote_sensing.georef import (
    answer_to_geojson,
    find_tile_references,
    parse_rboxes,
    referenced_tiles,
)
from domain_data.remote_sensing.tiling import tile_image

# rasterio's own Affine arithmetic warns about `*` (affine 3); not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")


def _signed_area(ring: list[list[float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]))


def _assert_valid_geojson(collection: dict, lonlat: bool) -> None:
    json.dumps(collection, allow_nan=False)  # strict JSON
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert _signed_area(ring) > 0, "exterior rings must be counter-clockwise"
        if lonlat:
            assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)


@pytest.mark.parametrize("text, expected", [
    ("The airport is in row 3, column 5.", [(2, 4)]),
    ("see Row 2 col 1 and column 2 and row 4", [(1, 0), (3, 1)]),
    ("tiles (1, 2) and r4c5, then (1,2) again", [(0, 1), (3, 4)]),
    ("row three, column two", [(2, 1)]),
    ("row #2, column no. 3", [(1, 2)]),
    ("nothing here", []),
])
def test_referenced_tiles_are_zero_based_from_one_based_text(text, expected):
    assert referenced_tiles(text, (4, 5)) == expected


def test_out_of_grid_and_ambiguous_references_are_unresolved():
    refs, unresolved = find_tile_references("row 9, column 1; (0, 2); row 2 has ships", (4, 5))
    assert refs == [] and len(unresolved) == 3
    assert any("outside the 4 x 5 grid" in u for u in unresolved) and any("no column" in u for u in unresolved)
    assert referenced_tiles("ships in column 3", (1, 6)) == [(0, 2)]  # 1 x N: a column names a tile
    assert referenced_tiles("ships in row 4", (7, 1)) == [(3, 0)]  # N x 1: a row names a tile


def test_parse_fitrs_boxes():
    text = ("There are 2 ships in the image: <rbox>({<50.00><50.00><20.00><10.00>|<0>}, "
            "{<50.00><50.00><20.00><10.00>|<90>})</rbox> and <rbox>({<10,10><30,10><30,20><10,20>})</rbox> "
            "and <rbox>({<1><2>})</rbox>")
    boxes, unreadable = parse_rboxes(text)
    assert len(boxes) == 3 and len(unreadable) == 1
    xs, ys = zip(*boxes[0].corners)
    assert (min(xs), max(xs), min(ys), max(ys)) == pytest.approx((40, 60, 45, 55))
    xs, ys = zip(*boxes[1].corners)  # rotated 90 degrees: the width runs down the image
    assert (min(xs), max(xs), min(ys), max(ys)) == pytest.approx((45, 55, 40, 60))
    assert boxes[1].params == {"cx": 50.0, "cy": 50.0, "w": 20.0, "h": 10.0, "angle": 90.0}
    assert boxes[2].params["points"][2] == [30.0, 20.0]


@pytest.fixture
def utm_tiled(tmp_path, rs):
    data = rs.seeded_image((3, 701, 1003), "uint16", 11)
    path = rs.write_raster(tmp_path / "utm.tif", data, rs.UTM_33N, rs.UTM_TRANSFORM, nodata=0, tiled=True)
    with tile_image(path, max_tiles=100) as tiled:
        yield tiled


def test_tile_and_box_to_lonlat_geojson(utm_tiled):
    answer = "Row 2, column 3 holds a ship <rbox>({<50.00><50.00><10.00><10.00>|<0>})</rbox>."
    collection = answer_to_geojson(answer, utm_tiled)
    _assert_valid_geojson(collection, lonlat=True)
    assert collection["georeferenced"] and collection["coordinate_system"].startswith("EPSG:4326")
    tile_feature, box_feature = collection["features"]
    info = utm_tiled.tile_at(1, 2)
    props = tile_feature["properties"]
    assert (props["tile_row"], props["tile_col"], props["kind"]) == (2, 3, "tile")
    assert props["pixel_window"] == info.pixel_window() and props["source_crs"] == "EPSG:32633"
    assert props["answer"] == answer
    (ring,) = tile_feature["geometry"]["coordinates"]
    lons, lats = np.array(ring).T
    west, south, east, north = info.lonlat_bounds
    assert lons.min() == pytest.approx(west) and lats.max() == pytest.approx(north, abs=1e-9)
    assert 14 < lons.mean() < 16 and 35 < lats.mean() < 37  # lon first, then lat (UTM 33N, northing 4000 km)
    # The box centre is tile pixel (168, 168); the tile's data starts at placement (x0, y0).
    x0, y0 = info.placement[:2]
    centre = (info.window.col_off + 168 - x0, info.window.row_off + 168 - y0)
    pixels = np.array(box_feature["properties"]["pixel_polygon"])
    assert pixels.mean(axis=0) == pytest.approx(centre)
    assert np.ptp(pixels[:, 0]) == pytest.approx(33.6)
    crs_x, crs_y = zip(*(utm_tiled.raster.transform @ tuple(p) for p in pixels))
    lon, lat = warp_transform("EPSG:32633", "EPSG:4326", list(crs_x), list(crs_y))
    (box_ring,) = box_feature["geometry"]["coordinates"]
    assert sorted(map(tuple, np.round(box_ring[:-1], 9))) == sorted(zip(np.round(lon, 9), np.round(lat, 9)))
    assert box_feature["properties"]["relative_to"] == "tile"


def test_geographic_raster_keeps_lon_lat_order(tmp_path, rs):
    path = rs.write_raster(tmp_path / "geo.tif", rs.seeded_image((3, 345, 677), "uint8", 3),
                           rs.GEOGRAPHIC, rs.GEO_TRANSFORM)
    with tile_image(path) as tiled:
        collection = answer_to_geojson("row 1, column 1", tiled)
    _assert_valid_geojson(collection, lonlat=True)
    (ring,) = collection["features"][0]["geometry"]["coordinates"]
    lons, lats = np.array(ring).T
    assert lons.min() == pytest.approx(100.0) and lats.max() == pytest.approx(-10.0)
    assert lons.max() == pytest.approx(100.0 + 0.0005 * tiled.tile_at(0, 0).window.width)


def test_boxes_attach_to_the_preceding_tile_or_thumbnail(utm_tiled):
    box = "<rbox>({<50.00><50.00><2.00><2.00>|<0>})</rbox>"
    only_box = answer_to_geojson(f"A tank {box}.", utm_tiled)["features"]
    assert len(only_box) == 1 and only_box[0]["properties"]["relative_to"] == "thumbnail"
    centre = np.array(only_box[0]["properties"]["pixel_polygon"]).mean(axis=0)
    x0, y0, x1, y1 = utm_tiled.thumbnail_box  # centre of the padded thumbnail, mapped through its content box
    assert centre == pytest.approx(((168 - x0) * 1003 / (x1 - x0), (168 - y0) * 701 / (y1 - y0)))
    assert np.abs(centre - (1003 / 2, 701 / 2)).max() <= 701 / (y1 - y0)  # within one thumbnail pixel
    before = answer_to_geojson(f"A tank {box}, in row 3, column 1.", utm_tiled)["features"]
    assert before[1]["properties"]["tile_row"] == 3  # the only tile named in the answer
    two = answer_to_geojson(f"row 1, column 1 {box} row 3, column 3 {box}", utm_tiled)["features"]
    assert [f["properties"]["tile_col"] for f in two if f["properties"]["kind"] == "rbox"] == [1, 3]


def test_non_georeferenced_image_answers_in_pixels(tmp_path, rs):
    path = rs.write_raster(tmp_path / "photo.png", rs.seeded_image((3, 200, 500), "uint8", 4), driver="PNG")
    with tile_image(path, tile_size=100) as tiled:
        collection = answer_to_geojson("row 2, column 5", tiled)
    _assert_valid_geojson(collection, lonlat=False)
    assert not collection["georeferenced"] and "pixel" in collection["coordinate_system"]
    assert "not lon/lat" in collection["note"]
    (ring,) = collection["features"][0]["geometry"]["coordinates"]
    xs, ys = np.array(ring).T
    info = tiled.tile_at(1, 4)
    assert (xs.min(), xs.max()) == (info.window.col_off, info.window.col_off + info.window.width)
    assert (ys.min(), ys.max()) == (info.window.row_off, info.window.row_off + info.window.height)
    assert collection["features"][0]["properties"]["source_crs"] is None
