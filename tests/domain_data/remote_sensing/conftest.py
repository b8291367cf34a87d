"""Seeded raster writers for the remote-sensing tests (no binaries in git)."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning


def write_raster(path: Path, data: np.ndarray, crs: str | None = None, transform=None, nodata=None,
                 driver: str = "GTiff", **options) -> Path:
    """Write ``data`` (bands, rows, cols) to ``path``."""
    count, height, width = data.shape
    profile = dict(driver=driver, width=width, height=height, count=count, dtype=data.dtype.name)
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    profile.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def seeded_image(shape: tuple[int, int, int], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    high = 256 if dtype == "uint8" else 10000
    low = 1  # 0 is kept free for nodata
    return rng.integers(low, high, size=shape).astype(dtype)


UTM_33N = "EPSG:32633"
UTM_TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)  # north-up, 10 m pixels
GEOGRAPHIC = "EPSG:4326"
GEO_TRANSFORM = Affine(0.0005, 0.0, 100.0, 0.0, -0.0005, -10.0)  # lon 100 E, lat 10 S


@pytest.fixture
def utm_uint16(tmp_path: Path) -> Path:
    """1003 x 701 uint16, UTM 33N, nodata 0 in a 5-pixel frame on the left."""
    data = seeded_image((3, 701, 1003), "uint16", seed=1)
    data[:, :, :5] = 0
    return write_raster(tmp_path / "utm_uint16.tif", data, UTM_33N, UTM_TRANSFORM, nodata=0,
                        tiled=True, blockxsize=256, blockysize=256)


@pytest.fixture
def geographic_uint8(tmp_path: Path) -> Path:
    """677 x 345 uint8 RGB in lon/lat (EPSG:4326), no nodata."""
    data = seeded_image((3, 345, 677), "uint8", seed=2)
    return write_raster(tmp_path / "geo_uint8.tif", data, GEOGRAPHIC, GEO_TRANSFORM, photometric="RGB")


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` RGB pixels but holds almost no image data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def tiff_header_only(path: Path, width: int, height: int) -> Path:
    """A little-endian baseline TIFF whose one IFD declares ``width`` x ``height`` 8-bit grey pixels."""
    long_tags = {256: width, 257: height, 273: 8, 278: height, 279: 1}
    short_tags = {258: 8, 259: 1, 262: 1, 277: 1}
    entries = sorted([(tag, 4, value) for tag, value in long_tags.items()]
                     + [(tag, 3, value) for tag, value in short_tags.items()])
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0))
    return path


@pytest.fixture
def rs() -> SimpleNamespace:
    """The writers above (test modules cannot import conftest under --import-mode=importlib)."""
    return SimpleNamespace(write_raster=write_raster, seeded_image=seeded_image, png_header_only=png_header_only,
                           tiff_header_only=tiff_header_only, UTM_33N=UTM_33N, UTM_TRANSFORM=UTM_TRANSFORM,
                           GEOGRAPHIC=GEOGRAPHIC, GEO_TRANSFORM=GEO_TRANSFORM)
