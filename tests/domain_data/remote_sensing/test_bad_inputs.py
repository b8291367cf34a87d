"""Bad rasters end in one clear RasterInputError (names the file, says what is wrong), never a crash."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window

from domain_data.remote_sensing.errors import RasterInputError
from domain_data.remote_sensing.inspect import inspect_raster
from domain_data.remote_sensing.raster import open_raster
from domain_data.remote_sensing.tiling import tile_image
from longllava.cli import main as cli_main
from longllava.errors import UserInputError

# rasterio's own Affine arithmetic warns about `*` (affine 3); not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")


def _empty(tmp_path, rs):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    return path, "empty"


def _truncated(tmp_path, rs):
    full = rs.write_raster(tmp_path / "full.tif", rs.seeded_image((3, 400, 400), "uint8", 0))
    path = tmp_path / "truncated.tif"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return path, "truncated or corrupt"


def _two_bands(tmp_path, rs):
    return rs.write_raster(tmp_path / "two.tif", rs.seeded_image((2, 20, 20), "uint16", 0)), "2 bands"


def _huge_declared(tmp_path, rs):
    return rs.tiff_header_only(tmp_path / "huge.tif", 10**6, 10**6), "1000000 x 1000000"


def _not_a_raster(tmp_path, rs):
    path = tmp_path / "notes.tif"
    path.write_text("these are field notes, not pixels\n")
    return path, "not a raster"


def _unsupported_driver(tmp_path, rs):
    path = tmp_path / "grid.asc"
    path.write_text("ncols 3\nnrows 2\nxllcorner 0\nyllcorner 0\ncellsize 1\n1 2 3\n4 5 6\n")
    return path, "AAIGrid"


def _corrupt_header(tmp_path, rs):
    path = tmp_path / "corrupt.tif"
    path.write_bytes(b"II*\x00" + np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path, "header is corrupt"


def _all_nodata(tmp_path, rs):
    data = np.full((3, 30, 40), 7, dtype=np.uint16)
    return rs.write_raster(tmp_path / "nodata.tif", data, nodata=7), "only nodata"


def _all_nan(tmp_path, rs):
    return rs.write_raster(tmp_path / "nan.tif", np.full((3, 16, 16), np.nan, dtype=np.float32)), "NaN"


def _png_bomb(tmp_path, rs):
    return rs.png_header_only(tmp_path / "bomb.png", 20000, 20000), "decompression-bomb"


def _folder(tmp_path, rs):
    return tmp_path, "is a folder"


def _missing(tmp_path, rs):
    return tmp_path / "nowhere.tif", "no such file"


def _complex(tmp_path, rs):
    return rs.write_raster(tmp_path / "sar.tif", np.ones((1, 8, 8), dtype=np.complex64)), "complex"


BAD_INPUTS = {f.__name__.lstrip("_"): f for f in (
    _empty, _truncated, _two_bands, _huge_declared, _not_a_raster, _unsupported_driver, _corrupt_header,
    _all_nodata, _all_nan, _png_bomb, _folder, _missing, _complex)}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_raster_gives_clear_error(name, tmp_path, rs):
    path, expected = BAD_INPUTS[name](tmp_path, rs)
    with pytest.raises(RasterInputError) as caught:
        with tile_image(path) as tiled:
            list(tiled.tiles)
    message = str(caught.value)
    assert expected in message and str(path) in message
    assert isinstance(caught.value, UserInputError)


def test_bad_band_choice(tmp_path, rs):
    path = rs.write_raster(tmp_path / "rgb.tif", rs.seeded_image((3, 10, 10), "uint8", 0))
    with pytest.raises(RasterInputError, match="band index 5 does not exist; the raster has bands 1..3"):
        open_raster(path, bands=(1, 2, 5))
    with pytest.raises(RasterInputError, match="three 1-based band indexes"):
        open_raster(path, bands=(1, 2))
    two = rs.write_raster(tmp_path / "two.tif", rs.seeded_image((2, 10, 10), "uint8", 0))
    with open_raster(two, bands=(1, 2, 2)) as raster:  # an explicit choice makes a 2-band image usable
        assert raster.read_window(Window(0, 0, 10, 10)).shape == (10, 10, 3)


def test_bad_tiling_arguments(tmp_path, rs):
    path = rs.write_raster(tmp_path / "rgb.tif", rs.seeded_image((3, 10, 10), "uint8", 0))
    with pytest.raises(RasterInputError, match="max_tiles"):
        tile_image(path, max_tiles=0)
    with pytest.raises(RasterInputError, match="tile_size"):
        tile_image(path, tile_size=-3)


def test_cli_inspect_reports_bad_input_in_one_line(tmp_path, rs, capsys):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    assert cli_main(["inspect", "--geotiff", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "empty" in err


def test_inspect_report_and_cli(tmp_path, rs, capsys):
    data = rs.seeded_image((3, 701, 1003), "uint16", 5)
    path = rs.write_raster(tmp_path / "utm.tif", data, rs.UTM_33N, rs.UTM_TRANSFORM, nodata=0, tiled=True)
    report = inspect_raster(path, max_tiles=4)
    assert (report["width"], report["height"], report["band_count"], report["dtype"]) == (1003, 701, 3, "uint16")
    assert report["crs"] == "EPSG:32633" and report["georeferenced"]
    assert report["grid"] == [2, 2] and report["tile_count"] == 4 and report["level"]["scale"] == 2
    assert "downsampled 1:2" in report["level"]["note"]
    assert cli_main(["inspect", "--geotiff", str(path), "--json"]) == 0
    assert '"tile_count": 9' in capsys.readouterr().out  # default budget: full resolution, 3 x 3
    assert cli_main(["inspect", "--geotiff", str(path)]) == 0
    text = capsys.readouterr().out
    assert "1003 x 701 px" in text and "EPSG:32633" in text and "3 rows x 3 columns = 9 tiles" in text
