"""Tiling seeded GeoTIFFs: order, padding, exact coverage, pixels, bounds against rasterio, lazy reads."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from domain_data.remote_sensing.raster import PAD_COLOUR, open_raster
from domain_data.remote_sensing.tiling import LazyTiles, plan_grid, tile_image
from longllava.protocol import count_images, grid_prompt

# rasterio's own Affine arithmetic warns about `*` (affine 3); not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")


@dataclass(frozen=True)
class Case:
    shape: tuple[int, int, int]  # (bands, rows, cols)
    dtype: str
    crs: str | None  # "utm", "geo" or None
    nodata_frame: int  # nodata (0) columns on the left
    tile_size: int
    max_tiles: int
    grid: tuple[int, int]
    scale: int


CASES = {
    "utm_uint16_nodata_3x3": Case((3, 701, 1003), "uint16", "utm", 5, 336, 100, (3, 3), 1),
    "geo_uint8_1x1": Case((3, 150, 201), "uint8", "geo", 0, 336, 100, (1, 1), 1),
    "geo_uint8_1xN": Case((3, 97, 1201), "uint8", "geo", 0, 336, 100, (1, 4), 1),
    "utm_uint8_Nx1": Case((3, 1111, 65), "uint8", "utm", 0, 100, 100, (12, 1), 1),
    "utm_uint16_odd_small_tiles": Case((3, 53, 71), "uint16", "utm", 3, 16, 100, (4, 5), 1),
    "utm_uint8_downsampled": Case((3, 1000, 1501), "uint8", "utm", 0, 100, 20, (3, 4), 4),
}


def _write_case(tmp_path: Path, rs: types.SimpleNamespace, name: str) -> tuple[Path, np.ndarray]:
    case = CASES[name]
    data = rs.seeded_image(case.shape, case.dtype, seed=sum(map(ord, name)))
    if case.nodata_frame:
        data[:, :, : case.nodata_frame] = 0
    crs, transform = {"utm": (rs.UTM_33N, rs.UTM_TRANSFORM), "geo": (rs.GEOGRAPHIC, rs.GEO_TRANSFORM),
                      None: (None, None)}[case.crs]
    path = rs.write_raster(tmp_path / f"{name}.tif", data, crs, transform,
                           nodata=0 if case.nodata_frame else None, tiled=True, blockxsize=64, blockysize=64)
    return path, data


@pytest.fixture(params=sorted(CASES))
def tiled_case(request, tmp_path, rs):
    path, data = _write_case(tmp_path, rs, request.param)
    case = CASES[request.param]
    with tile_image(path, tile_size=case.tile_size, max_tiles=case.max_tiles) as tiled:
        yield case, path, data, tiled


def test_grid_level_and_row_major_order(tiled_case):
    case, _, _, tiled = tiled_case
    assert tiled.grid == case.grid and tiled.scale == case.scale
    assert tiled.downsampled == (case.scale > 1)
    assert ("downsampled 1:" in tiled.note) == (case.scale > 1)
    rows, cols = tiled.grid
    assert [(t.row, t.col) for t in tiled.tile_infos] == [(r, c) for r in range(rows) for c in range(cols)]
    assert [t.index for t in tiled.tile_infos] == list(range(rows * cols))
    assert rows * cols <= case.max_tiles


def test_every_source_pixel_covered_exactly_once(tiled_case):
    case, _, data, tiled = tiled_case
    hits = np.zeros(data.shape[1:], dtype=np.int32)
    for info in tiled.tile_infos:
        w = info.window
        assert w.width > 0 and w.height > 0
        hits[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width] += 1
    assert (hits == 1).all()


def test_centred_padding_geometry(tiled_case):
    case, _, data, tiled = tiled_case
    size, scale, pad = case.tile_size, tiled.scale, tiled.padding
    level_h, level_w = -(-data.shape[1] // scale), -(-data.shape[2] // scale)
    rows, cols = tiled.grid
    assert pad.left + level_w + pad.right == cols * size and pad.top + level_h + pad.bottom == rows * size
    assert pad.left == (cols * size - level_w) // 2 and pad.right - pad.left in (0, 1)
    assert pad.top == (rows * size - level_h) // 2 and pad.bottom - pad.top in (0, 1)
    assert max(pad.left + pad.right, pad.top + pad.bottom) < size  # no tile is all padding
    for info in tiled.tile_infos:
        x0, y0, x1, y1 = info.placement
        assert x0 == (pad.left if info.col == 0 else 0) and y0 == (pad.top if info.row == 0 else 0)
        assert x1 == (size - pad.right if info.col == cols - 1 else size)
        assert y1 == (size - pad.bottom if info.row == rows - 1 else size)
        # The placement holds exactly the window's level pixels.
        assert x1 - x0 == -(-info.window.width // scale) and y1 - y0 == -(-info.window.height // scale)


def _expected_rgb(data: np.ndarray, tiled) -> np.ndarray:
    """Source (bands, h, w) -> expected (h, w, 3) uint8 with the raster's own stretch and nodata paint."""
    rgb = tiled.raster.stretch.apply(data[list(b - 1 for b in tiled.raster.bands)])
    image = np.moveaxis(rgb, 0, -1).copy()
    if tiled.raster.nodata is not None:
        image[(data == tiled.raster.nodata).all(axis=0)] = PAD_COLOUR
    return image


def _block_average(image: np.ndarray, scale: int) -> np.ndarray:
    """(h, w, 3) -> (ceil(h/s), ceil(w/s), 3) mean of each s x s block (partial blocks at the edges)."""
    h, w, _ = image.shape
    out = np.zeros((-(-h // scale), -(-w // scale), 3))
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            out[y, x] = image[y * scale:(y + 1) * scale, x * scale:(x + 1) * scale].reshape(-1, 3).mean(axis=0)
    return out


def test_tiles_mosaic_back_to_the_padded_source(tiled_case):
    case, _, data, tiled = tiled_case
    rows, cols = tiled.grid
    size = case.tile_size
    mosaic = np.zeros((rows * size, cols * size, 3), dtype=np.uint8)
    for info, tile in zip(tiled.tile_infos, tiled.tiles):
        assert tile.size == (size, size) and tile.mode == "RGB"
        mosaic[info.row * size:(info.row + 1) * size, info.col * size:(info.col + 1) * size] = np.asarray(tile)
    pad = tiled.padding
    level = mosaic[pad.top:rows * size - pad.bottom, pad.left:cols * size - pad.right]
    padding_mask = np.ones(mosaic.shape[:2], dtype=bool)
    padding_mask[pad.top:rows * size - pad.bottom, pad.left:cols * size - pad.right] = False
    assert (mosaic[padding_mask] == PAD_COLOUR).all()
    expected = _expected_rgb(data, tiled)
    if tiled.scale == 1:
        np.testing.assert_array_equal(level, expected)
    else:  # each level pixel is the average of its scale x scale source block (GDAL rounds)
        assert np.abs(level.astype(float) - _block_average(expected, tiled.scale)).max() <= 1.0


def test_bounds_agree_with_rasterio(tiled_case):
    case, path, _, tiled = tiled_case
    assert tiled.georeferenced
    with rasterio.open(path) as ds:
        for info in tiled.tile_infos:
            expected = ds.window_bounds(info.window)
            np.testing.assert_allclose(info.crs_bounds, expected, rtol=0, atol=1e-9)
            w = info.window  # independent affine arithmetic: left, bottom, right, top
            a, _, c, _, e, f = list(ds.transform)[:6]
            np.testing.assert_allclose(
                info.crs_bounds,
                (c + w.col_off * a, f + (w.row_off + w.height) * e, c + (w.col_off + w.width) * a, f + w.row_off * e))
            np.testing.assert_allclose(info.lonlat_bounds,
                                       transform_bounds(ds.crs, "EPSG:4326", *expected, densify_pts=21))
            west, south, east, north = info.lonlat_bounds
            assert -180 <= west < east <= 180 and -90 <= south < north <= 90


def test_prompt_images_and_lazy_tiles(tiled_case):
    case, path, _, tiled = tiled_case
    rows, cols = tiled.grid
    assert tiled.prompt == grid_prompt(rows, cols)
    assert count_images(tiled.prompt) == rows * cols + 1
    with tile_image(path, tile_size=case.tile_size, max_tiles=case.max_tiles, tile_labels=True) as labelled:
        assert labelled.prompt == grid_prompt(rows, cols, tile_labels=True) != tiled.prompt
    tiles = tiled.tiles
    assert isinstance(tiles, LazyTiles) and len(tiles) == rows * cols
    iterator = iter(tiles)
    assert isinstance(iterator, types.GeneratorType)  # read on demand, not a prepared list
    first = next(iterator)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(tiles[0]))
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(tiled.read_tile(rows * cols - 1)))
    images = list(tiled.images())
    assert len(images) == rows * cols + 1 and images[0] is tiled.thumbnail


def test_thumbnail_is_padded_square_with_the_tile_pad_colour(tiled_case):
    case, _, data, tiled = tiled_case
    size = case.tile_size
    thumb = np.asarray(tiled.thumbnail)
    assert thumb.shape == (size, size, 3)
    x0, y0, x1, y1 = tiled.thumbnail_box
    height, width = data.shape[1:]
    assert abs((x1 - x0) / (y1 - y0) - width / height) < 2.5 / min(x1 - x0, y1 - y0) + 1e-9
    assert max(x1 - x0, y1 - y0) == size
    outside = np.ones((size, size), dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert (thumb[outside] == PAD_COLOUR).all()
    assert x0 == (size - (x1 - x0)) // 2 and y0 == (size - (y1 - y0)) // 2


def test_stretch_from_percentiles_of_valid_pixels(tmp_path, rs):
    path, data = _write_case(tmp_path, rs, "utm_uint16_nodata_3x3")
    with open_raster(path) as raster:
        assert raster.stretch.kind == "percentile"
        for channel in range(3):
            valid = data[channel][data[channel] != 0]  # small raster: the decimated read is the full image
            np.testing.assert_allclose((raster.stretch.low[channel], raster.stretch.high[channel]),
                                       np.percentile(valid, [2, 98]))
        tile = raster.read_window(Window(0, 0, 8, 8))
        assert (tile[:, :5] == PAD_COLOUR).all()  # nodata frame painted with the pad colour
        assert raster.crs.to_string() == "EPSG:32633" and raster.georeferenced


def test_downsampled_level_is_chosen_and_explained():
    plan = plan_grid(27860, 31096, 336, 1000)  # STAR's largest image
    assert (plan.rows, plan.cols, plan.scale) == (31, 28, 3) and plan.tile_count <= 1000
    assert "7719 tiles" in plan.note and "1:3" in plan.note
    full = plan_grid(27860, 31096, 336, 10_000)
    assert full.scale == 1 and full.tile_count == 7719
    assert plan_grid(1, 1, 336, 1).tile_count == 1


def test_png_strip_reads_match_geotiff_window_reads(tmp_path, rs):
    data = rs.seeded_image((3, 251, 389), "uint8", seed=7)
    tif = rs.write_raster(tmp_path / "plain.tif", data)
    png = rs.write_raster(tmp_path / "plain.png", data, driver="PNG")
    with tile_image(tif, tile_size=64) as from_tif, tile_image(png, tile_size=64) as from_png:
        assert not from_png.georeferenced and from_png.raster.sequential
        assert "strip" in from_png.raster.describe()["read_strategy"]
        assert from_png.grid == from_tif.grid == (4, 7)
        for a, b in zip(from_tif.tiles, from_png.tiles):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_band_choice_grey_and_partial_nan(tmp_path, rs):
    data = rs.seeded_image((4, 40, 50), "uint8", seed=3)
    path = rs.write_raster(tmp_path / "four.tif", data)
    with open_raster(path, bands=(3, 2, 1)) as raster:
        np.testing.assert_array_equal(raster.read_window(Window(0, 0, 50, 40)), np.moveaxis(data[[2, 1, 0]], 0, -1))
    grey = rs.write_raster(tmp_path / "grey.tif", data[:1])
    with open_raster(grey) as raster:
        assert raster.bands == (1, 1, 1) and "grey" in raster.band_note
        rgb = raster.read_window(Window(0, 0, 50, 40))
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    floats = rs.seeded_image((3, 30, 30), "uint16", seed=4).astype("float32")
    floats[:, :10, :10] = np.nan
    path = rs.write_raster(tmp_path / "nan.tif", floats)
    with open_raster(path) as raster:
        rgb = raster.read_window(Window(0, 0, 30, 30))
        assert (rgb[:10, :10] == PAD_COLOUR).all() and np.isfinite(raster.stretch.low).all()


def test_raster_reopens_after_close(tmp_path, rs):
    path, _ = _write_case(tmp_path, rs, "geo_uint8_1x1")
    tiled = tile_image(path)
    tiled.close()
    assert np.asarray(tiled.tiles[0]).shape == (336, 336, 3)
    tiled.close()


def test_raster_with_overviews_tiles_like_one_without(tmp_path, rs):
    from rasterio.enums import Resampling

    data = rs.seeded_image((3, 400, 600), "uint8", seed=9)
    plain = rs.write_raster(tmp_path / "plain.tif", data, rs.UTM_33N, rs.UTM_TRANSFORM, tiled=True)
    with_overviews = rs.write_raster(tmp_path / "cog.tif", data, rs.UTM_33N, rs.UTM_TRANSFORM, tiled=True)
    with rasterio.open(with_overviews, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.average)
    with tile_image(plain, tile_size=100, max_tiles=6) as a, tile_image(with_overviews, tile_size=100,
                                                                        max_tiles=6) as b:
        assert a.scale == b.scale == 2 and a.grid == b.grid == (2, 3)
        for tile_a, tile_b in zip(a.tiles, b.tiles):
            assert np.abs(np.asarray(tile_a, dtype=int) - np.asarray(tile_b, dtype=int)).max() <= 1
