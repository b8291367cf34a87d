"""Satellite scenes: tile rule, objects inside their tiles, GeoTIFF georeference, agreement with the tiler."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from domain_data.synthetic.errors import SyntheticDataError
from domain_data.synthetic.satellite import (
    CLASSES,
    OBJECT_KINDS,
    _object_shape,
    make_scene,
    object_footprint,
    objects_mask,
    tile_grid,
    tile_of,
    write_geotiff,
)

HAS_TILER = importlib.util.find_spec("domain_data.remote_sensing.tiling") is not None


@pytest.fixture(scope="module")
def scene():
    return make_scene(
        5, 700, 1100, objects={"ship": 3, "storage tank": 4, "building": {"count": 5, "spread": True}}
    )


def test_tile_rule_centred_padding():
    # 700 px -> 3 rows of 336 = 1008: pad 308 -> 154 before; 1100 -> 4 cols = 1344: pad 244 -> 122 before
    grid = tile_grid(700, 1100, 336)
    assert (grid.rows, grid.cols, grid.pad_top, grid.pad_left) == (3, 4, 154, 122)
    assert tile_of(0, 0, 700, 1100) == (1, 1)
    assert tile_of(336 - 122 - 1, 336 - 154 - 1, 700, 1100) == (1, 1)
    assert tile_of(336 - 122, 336 - 154, 700, 1100) == (2, 2)
    assert tile_of(1099, 699, 700, 1100) == (3, 4)
    assert tile_grid(672, 1008, 336).pad_top == 0 and tile_of(1007, 671, 672, 1008) == (2, 3)
    odd = tile_grid(337, 337, 336)  # pad 335: 167 before, 168 after (odd pixel after)
    assert (odd.rows, odd.pad_top) == (2, 167)
    assert tile_of(100, 0, 2000, 2000, tile_size=336, scale=2) == (1, 1)  # level 1000 px -> 3 tiles, pad 4
    assert tile_of(1999, 1999, 2000, 2000, tile_size=336, scale=2) == (3, 3)
    with pytest.raises(SyntheticDataError):
        tile_of(1100, 0, 700, 1100)


def test_windows_partition_the_image():
    grid = tile_grid(700, 1100, 336)
    cover = np.zeros((700, 1100), dtype=np.int32)
    for r in range(1, grid.rows + 1):
        for c in range(1, grid.cols + 1):
            x0, y0, x1, y1 = grid.window(r, c)
            cover[y0:y1, x0:x1] += 1
            assert tile_of(x0, y0, 700, 1100) == (r, c) and tile_of(x1 - 1, y1 - 1, 700, 1100) == (r, c)
    assert (cover == 1).all()


def test_same_seed_same_scene():
    a, b = make_scene(9, 400, 500), make_scene(9, 400, 500)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.ground_truth() == b.ground_truth()
    assert not np.array_equal(a.image, make_scene(10, 400, 500).image)


def test_objects_counted_and_wholly_inside_one_tile(scene):
    assert {k: scene.count(k) for k in OBJECT_KINDS} == {"ship": 3, "storage tank": 4, "building": 5}
    grid = scene.grid()
    for obj in scene.objects:
        assert obj.tiles(scene.height, scene.width) == {obj.tile(scene.height, scene.width)}
        x0, y0, x1, y1 = grid.window(*obj.tile(scene.height, scene.width))
        bx0, by0, bx1, by1 = obj.bbox
        assert x0 + 4 <= bx0 and y0 + 4 <= by0 and bx1 <= x1 - 4 and by1 <= y1 - 4
    # clustered kinds sit in one tile; the painted pixels of every object lie in its tile
    assert len(scene.tiles_with("ship")) == 1 and len(scene.tiles_with("storage tank")) == 1
    objects = scene.classes == CLASSES["object"]
    painted = np.zeros_like(objects)
    for obj in scene.objects:
        bx0, by0, bx1, by1 = obj.bbox
        painted[by0:by1, bx0:bx1] = True
    assert objects[~painted].sum() == 0
    for obj in scene.objects:  # the boxes are tight: every edge row / column holds object pixels
        bx0, by0, bx1, by1 = obj.bbox
        box = objects[by0:by1, bx0:bx1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()


def test_ships_on_water_and_land_objects_on_land(scene):
    classes_before = make_scene(5, 700, 1100, objects={}).classes
    for obj in scene.objects:
        bx0, by0, bx1, by1 = obj.bbox
        footprint = scene.classes[by0:by1, bx0:bx1] == CLASSES["object"]
        under = classes_before[by0:by1, bx0:bx1][footprint]
        if obj.kind == "ship":
            assert (under == CLASSES["water"]).all()
        else:
            assert np.isin(under, [CLASSES["field"], CLASSES["soil"]]).all()


def test_explicit_tile_and_errors():
    placed = make_scene(3, 672, 1008, objects={"storage tank": {"count": 2, "tile": (2, 1)}, "ship": 0})
    assert placed.tiles_with("storage tank") == [(2, 1)] and placed.count("ship") == 0
    with pytest.raises(SyntheticDataError):
        make_scene(3, 672, 1008, objects={"plane": 2})
    with pytest.raises(SyntheticDataError):
        make_scene(3, 10, 1008)


@pytest.mark.parametrize("dtype,crs", [("uint8", "EPSG:32633"), ("uint16", "EPSG:4326")])
def test_geotiff_crs_transform_and_pixels(tmp_path, dtype, crs):
    scene = make_scene(4, 300, 420, objects={"building": 2}, dtype=dtype)
    path = write_geotiff(scene, tmp_path / "s.tif", crs=crs)
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == int(crs.split(":")[1])
        assert (src.count, src.height, src.width, src.dtypes[0]) == (3, 300, 420, dtype)
        expected = (
            from_origin(14.0, 42.0, 5e-6, 5e-6)
            if crs == "EPSG:4326"
            else from_origin(500000, 4650000, 0.5, 0.5)
        )
        assert src.transform.almost_equals(expected)
        assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
        np.testing.assert_array_equal(np.moveaxis(src.read(), 0, -1), scene.image)
    if dtype == "uint16":
        assert scene.image.max() > 255 and scene.image.max() <= 4095
    with pytest.raises(SyntheticDataError):
        write_geotiff(scene, tmp_path / "bad.tif", crs="EPSG:not-a-code")


@pytest.mark.skipif(not HAS_TILER, reason="domain_data.remote_sensing.tiling not available")
def test_project_tiler_puts_each_object_in_the_stated_tile(scene, tmp_path):
    from domain_data.remote_sensing.tiling import tile_image

    path = write_geotiff(scene, tmp_path / "s.tif")
    with tile_image(path, tile_size=336, max_tiles=64) as tiled:
        assert tiled.grid == (scene.grid().rows, scene.grid().cols)
        for obj in scene.objects:
            row, col = obj.tile(scene.height, scene.width)
            window = tiled.tile_at(row - 1, col - 1).window
            bx0, by0, bx1, by1 = obj.bbox
            assert window.col_off <= bx0 and bx1 <= window.col_off + window.width
            assert window.row_off <= by0 and by1 <= window.row_off + window.height
            # the tile image the model sees holds the object's pixels
            tile = np.asarray(tiled.read_tile((row - 1) * tiled.grid[1] + (col - 1)))
            px0, py0, _, _ = tiled.tile_at(row - 1, col - 1).placement
            u0, v0 = int(bx0 - window.col_off + px0), int(by0 - window.row_off + py0)
            np.testing.assert_array_equal(
                tile[v0 : v0 + by1 - by0, u0 : u0 + bx1 - bx0], scene.image[by0:by1, bx0:bx1]
            )


def test_object_footprint_is_what_the_scene_paints():
    rng = np.random.default_rng(11)
    for kind in OBJECT_KINDS:
        for _ in range(20):
            shape = _object_shape(kind, rng, 1.5)
            np.testing.assert_array_equal(
                object_footprint(kind, shape["length"], shape["width"], shape["angle"]), shape["mask"]
            )


def test_objects_mask_from_the_ground_truth_covers_the_painted_objects(scene):
    records = [o.to_json() for o in scene.objects]  # sizes rounded to 0.01 px, angles to 0.1 degree
    painted = scene.classes == CLASSES["object"]
    masks = {kind: objects_mask(records, kind, (0, 0), painted.shape) for kind in OBJECT_KINDS}
    union = np.logical_or.reduce(list(masks.values()))
    assert (union & painted).sum() / (union | painted).sum() > 0.99
    assert not (masks["ship"] & masks["building"]).any()
    # a window hanging over the scene's corner keeps only what lies inside it
    corner = objects_mask(records, "building", (-100, -50), (300, 400))
    np.testing.assert_array_equal(corner[50:, 100:], masks["building"][:250, :300])
    assert not corner[:50].any() and not corner[:, :100].any()
    with pytest.raises(SyntheticDataError, match="kind"):
        objects_mask(records, "tree", (0, 0), (10, 10))


@pytest.mark.skipif(not HAS_TILER, reason="domain_data.remote_sensing.tiling not available")
def test_objects_mask_at_a_tile_origin_lands_on_the_tiler_s_pixels(scene, tmp_path):
    from domain_data.remote_sensing.tiling import tile_image

    grid, records = scene.grid(), [o.to_json() for o in scene.objects]
    assert grid.pad_top and grid.pad_left  # the fixture is padded on both axes
    path = write_geotiff(scene, tmp_path / "s.tif")
    with tile_image(path, tile_size=336, max_tiles=64) as tiled:
        for row, col in {(o.tile(scene.height, scene.width)) for o in scene.objects}:
            origin = ((col - 1) * 336 - grid.pad_left, (row - 1) * 336 - grid.pad_top)
            tile = np.asarray(tiled.read_tile((row - 1) * grid.cols + (col - 1)))
            for kind in OBJECT_KINDS:
                v, u = np.nonzero(objects_mask(records, kind, origin, (336, 336)))
                np.testing.assert_array_equal(tile[v, u], scene.image[v + origin[1], u + origin[0]])
