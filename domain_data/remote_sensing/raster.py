"""Open a raster (GeoTIFF/COG, PNG, JPEG) and read it window by window as display-ready RGB.

* Reads are windowed (``rasterio`` ``Window``) or decimated (``out_shape``, which uses overviews
  when the file has them): the whole raster is never held in memory. GDAL's block cache is capped
  at :data:`GDAL_CACHE_BYTES` for every read.
* Three bands become R, G, B: the file's red/green/blue colour interpretation when it has one, else
  bands 1, 2, 3, or any three 1-based band indexes given as ``bands``. A 1-band image is grey
  replicated to R = G = B (or expanded through its palette); a 2-band image needs an explicit
  ``bands`` choice.
* One stretch for the whole raster: 8-bit data is used as is; any other type is stretched per band
  from its 2nd-98th percentiles, computed once from one decimated read (the "preview", at most
  :data:`PREVIEW_MAX_SIDE` pixels on its long side) and applied to every window, so tiles agree.
* Nodata (the nodata value, an alpha band or an internal mask) and non-finite floats are painted
  with :data:`PAD_COLOUR`, the same colour the tiler pads with.
* PNG and JPEG decode sequentially: they are limited to Pillow's decompression-bomb pixel limit
  and are flagged ``sequential`` so that the tiler reads them strip by strip. Convert larger ones
  to a tiled GeoTIFF (``gdal_translate -co TILED=YES in.png out.tif``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from domain_data.remote_sensing.errors import RasterInputError

GDAL_CACHE_BYTES = 256 * 2**20
PREVIEW_MAX_SIDE = 1024
STRETCH_PERCENTILES = (2.0, 98.0)
# CLIP's image mean as 8-bit RGB, as LLaVA's ``expand2square`` pads: int(mean * 255).
PAD_COLOUR: tuple[int, int, int] = (122, 116, 104)
# Above this many pixels a raster is refused (STAR's largest image is about 0.87e9 pixels).
MAX_RASTER_PIXELS = 4 * 10**9
SUPPORTED_DRIVERS: dict[str, str] = {"GTiff": "GeoTIFF", "PNG": "PNG", "JPEG": "JPEG"}
SEQUENTIAL_DRIVERS = frozenset({"PNG", "JPEG"})
SUPPORTED_HINT = "supported formats: GeoTIFF/COG (.tif), PNG, JPEG"

StretchMode = Literal["auto", "percentile"]


def _pil_pixel_limit() -> int:
    return int(Image.MAX_IMAGE_PIXELS or 2**62)


@dataclass(frozen=True)
class Stretch:
    """How band values become 8-bit: ``identity`` (8-bit data), ``percentile`` or ``palette``.

    ``low``/``high`` are per output channel (R, G, B): values at or below ``low`` map to 0, at or
    above ``high`` to 255, linearly in between.
    """

    kind: Literal["identity", "percentile", "palette"]
    low: tuple[float, float, float]
    high: tuple[float, float, float]
    percentiles: tuple[float, float] | None
    sample_shape: tuple[int, int]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """(3, H, W) band values -> (3, H, W) uint8."""
        if self.kind in ("identity", "palette"):
            return data.astype(np.uint8, copy=False)
        low = np.asarray(self.low, dtype=np.float32)[:, None, None]
        high = np.asarray(self.high, dtype=np.float32)[:, None, None]
        scaled = (data.astype(np.float32) - low) * (255.0 / (high - low))
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        return (np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "low": list(self.low),
            "high": list(self.high),
            "percentiles": list(self.percentiles) if self.percentiles else None,
            "from_decimated_read": list(self.sample_shape),
        }


def _gdal_env() -> rasterio.Env:
    # rasterio passes an integer GDAL_CACHEMAX to GDALSetCacheMax64 (bytes) and restores it on exit.
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise RasterInputError(f"{path}: no such file; give the path of a GeoTIFF, PNG or JPEG image")
    if path.is_dir():
        raise RasterInputError(f"{path} is a folder, not an image; give the raster file inside it ({SUPPORTED_HINT})")
    if path.stat().st_size == 0:
        raise RasterInputError(f"{path} is empty (0 bytes); the upload or copy did not complete, provide the file again")


def _open_dataset(path: Path) -> rasterio.io.DatasetReader:
    try:
        with _gdal_env(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as error:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise RasterInputError(
                f"{path} starts like a TIFF but its header is corrupt or truncated ({_short(error)}); "
                "provide the complete file again"
            ) from error
        raise RasterInputError(
            f"{path} is not a raster this suite can read ({_short(error)}); {SUPPORTED_HINT}"
        ) from error


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} {' '.join(str(cause).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _choose_bands(
    path: Path, dataset: rasterio.io.DatasetReader, bands: tuple[int, ...] | None
) -> tuple[tuple[int, int, int], str]:
    count = dataset.count
    if bands is not None:
        if len(bands) != 3 or not all(isinstance(b, int | np.integer) for b in bands):
            raise RasterInputError(f"{path}: bands must be three 1-based band indexes (R, G, B), got {bands!r}")
        bad = [b for b in bands if not 1 <= b <= count]
        if bad:
            raise RasterInputError(
                f"{path}: band index {bad[0]} does not exist; the raster has bands 1..{count}"
            )
        chosen = (int(bands[0]), int(bands[1]), int(bands[2]))
        return chosen, f"bands {chosen[0]}, {chosen[1]}, {chosen[2]} shown as R, G, B (as requested)"
    if count == 1:
        if dataset.colorinterp[0] == ColorInterp.palette:
            return (1, 1, 1), "1 band with a colour palette, expanded to RGB"
        return (1, 1, 1), "1 band: grey replicated to R = G = B"
    if count == 2:
        raise RasterInputError(
            f"{path} has 2 bands, which do not make an RGB image; choose three band indexes explicitly, "
            "e.g. bands=(1, 1, 1) for band 1 in grey or (1, 2, 2)"
        )
    interp = list(dataset.colorinterp)
    rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(ci in interp for ci in rgb):
        chosen = tuple(interp.index(ci) + 1 for ci in rgb)
        return chosen, f"bands {chosen[0]}, {chosen[1]}, {chosen[2]} are red, green, blue (from the file)"
    return (1, 2, 3), f"{count} bands without RGB colour interpretation: bands 1, 2, 3 shown as R, G, B"


def _is_georeferenced(dataset: rasterio.io.DatasetReader) -> tuple[bool, str]:
    has_transform = not dataset.transform.is_identity
    if dataset.crs is not None and has_transform:
        return True, "georeferenced"
    if has_transform:
        return False, "has a geotransform but no CRS: answers are given in pixel coordinates"
    if dataset.gcps[0]:
        return False, "has ground control points only (no geotransform): answers are given in pixel coordinates"
    return False, "no georeference: answers are given in pixel coordinates"


class Raster:
    """An open raster, read as 8-bit RGB window by window. Use as a context manager or call close().

    The file handle is reopened on demand after :meth:`close`, so a :class:`Raster` kept by an app
    or a tiler stays usable. Like the rasterio dataset under it, one object is for one thread at a time.
    """

    def __init__(self, path: str | os.PathLike, bands: tuple[int, int, int] | None = None,
                 stretch: StretchMode = "auto") -> None:
        self.path = Path(path)
        if stretch not in ("auto", "percentile"):
            raise RasterInputError(f"stretch must be 'auto' or 'percentile', got {stretch!r}")
        _check_path(self.path)
        self._dataset: rasterio.io.DatasetReader | None = _open_dataset(self.path)
        try:
            self._describe(bands)
            self._check_size()
            self._palette = self._read_palette()
            self._preview_rgb, self._preview_valid, self.stretch = self._read_preview(stretch)
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------
    def _describe(self, bands: tuple[int, int, int] | None) -> None:
        ds = self._ds
        self.driver: str = ds.driver
        if self.driver not in SUPPORTED_DRIVERS:
            raise RasterInputError(
                f"{self.path} is in GDAL's {ds.driver} format, which this suite does not read; {SUPPORTED_HINT} "
                "(convert it with: gdal_translate -of GTiff -co TILED=YES IN OUT.tif)"
            )
        self.width: int = ds.width
        self.height: int = ds.height
        self.count: int = ds.count
        self.dtype: str = ds.dtypes[0] if ds.count else "none"
        if ds.count == 0:
            raise RasterInputError(f"{self.path} has no bands; provide an image with 1, 3 or more bands")
        if np.dtype(self.dtype).kind == "c":
            raise RasterInputError(
                f"{self.path} holds complex numbers ({self.dtype}, e.g. SAR phase); convert it to "
                "amplitude (real values) first"
            )
        self.crs = ds.crs
        self.transform = ds.transform
        self.nodata = ds.nodata
        self.georeferenced, self.georeference_note = _is_georeferenced(ds)
        self.bands, self.band_note = _choose_bands(self.path, ds, bands)
        self.sequential: bool = self.driver in SEQUENTIAL_DRIVERS
        self.block_shape: tuple[int, int] = ds.block_shapes[0]

    def _check_size(self) -> None:
        pixels = self.width * self.height
        if pixels > MAX_RASTER_PIXELS:
            raise RasterInputError(
                f"{self.path} declares {self.width} x {self.height} pixels ({pixels:.3g}), more than the "
                f"{MAX_RASTER_PIXELS:.3g} this suite accepts; crop it or make a smaller copy "
                "(gdal_translate -outsize 25% 25% IN OUT.tif)"
            )
        limit = _pil_pixel_limit()
        if self.sequential and pixels > limit:
            raise RasterInputError(
                f"{self.path}: {self.driver} image of {self.width} x {self.height} pixels is over the "
                f"{limit} pixel limit for PNG/JPEG (Pillow's decompression-bomb limit: these formats "
                "cannot be read window by window); convert it to a tiled GeoTIFF: "
                "gdal_translate -co TILED=YES IN OUT.tif"
            )
        if self.width < 1 or self.height < 1:
            raise RasterInputError(f"{self.path} has no pixels ({self.width} x {self.height})")

    def _read_palette(self) -> np.ndarray | None:
        ds = self._ds
        if self.bands != (1, 1, 1) or ds.colorinterp[0] != ColorInterp.palette:
            return None
        try:
            colormap = ds.colormap(1)
        except ValueError:
            return None
        lut = np.zeros((max(256, max(colormap) + 1), 3), dtype=np.uint8)  # (entries, RGB)
        for index, rgba in colormap.items():
            lut[index] = rgba[:3]
        return lut

    def _read_preview(self, mode: StretchMode) -> tuple[np.ndarray, np.ndarray, Stretch]:
        factor = max(1.0, max(self.width, self.height) / PREVIEW_MAX_SIDE)
        shape = (max(1, round(self.height / factor)), max(1, round(self.width / factor)))
        values, valid = self._read_values(Window(0, 0, self.width, self.height), shape, Resampling.nearest)
        stretch = self._fit_stretch(values, valid, mode)
        rgb = stretch.apply(values)
        return _paint(rgb, valid), _any_valid(valid), stretch

    def _fit_stretch(self, values: np.ndarray, valid: np.ndarray, mode: StretchMode) -> Stretch:
        shape = (values.shape[1], values.shape[2])
        if not valid.any():
            what = "NaN/infinite values or nodata" if np.dtype(self.dtype).kind == "f" else "nodata"
            raise RasterInputError(
                f"{self.path} contains only {what} (checked on a {shape[1]} x {shape[0]} decimated read; "
                f"nodata value: {self.nodata}); there is nothing to show, provide an image with valid pixels"
            )
        if self._palette is not None:
            return Stretch("palette", (0.0,) * 3, (255.0,) * 3, None, shape)
        if self.dtype == "uint8" and mode == "auto":
            return Stretch("identity", (0.0,) * 3, (255.0,) * 3, None, shape)
        low, high = [], []
        for channel in range(3):
            sample = values[channel][valid[channel]]
            lo, hi = (float(v) for v in np.percentile(sample, STRETCH_PERCENTILES)) if sample.size else (0.0, 1.0)
            low.append(lo)
            high.append(hi if hi > lo else lo + 1.0)
        return Stretch("percentile", tuple(low), tuple(high), STRETCH_PERCENTILES, shape)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def _ds(self) -> rasterio.io.DatasetReader:
        if self._dataset is None or self._dataset.closed:
            self._dataset = _open_dataset(self.path)
        return self._dataset

    def _read_values(self, window: Window, out_shape: tuple[int, int],
                     resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
        """(3, h, w) band values (palette already expanded) and (3, h, w) validity per channel."""
        unique = sorted(set(self.bands))
        height, width = out_shape
        try:
            with _gdal_env():
                data = self._ds.read(unique, window=window, out_shape=(len(unique), height, width),
                                     resampling=resampling)
                masks = self._ds.read_masks(unique, window=window, out_shape=(len(unique), height, width),
                                            resampling=Resampling.nearest)
        except (RasterioError, ValueError) as error:
            raise RasterInputError(
                f"{self.path}: reading pixels {_window_text(window)} failed ({_short(error)}); the file is "
                "probably truncated or corrupt, provide it again"
            ) from error
        position = [unique.index(b) for b in self.bands]
        values = data[position]  # (3, h, w)
        valid = masks[position] > 0
        if values.dtype.kind == "f":
            valid &= np.isfinite(values)
        if self._palette is not None:
            indexes = np.clip(values[0].astype(np.int64), 0, len(self._palette) - 1)
            values = np.moveaxis(self._palette[indexes], -1, 0)  # (h, w, 3) -> (3, h, w)
        return values, valid

    def _check_window(self, window: Window) -> Window:
        window = Window(*(int(v) for v in (window.col_off, window.row_off, window.width, window.height)))
        inside = (window.col_off >= 0 and window.row_off >= 0 and window.width > 0 and window.height > 0
                  and window.col_off + window.width <= self.width
                  and window.row_off + window.height <= self.height)
        if not inside:
            raise ValueError(
                f"window {_window_text(window)} is not inside the {self.width} x {self.height} raster {self.path}"
            )
        return window

    def read_window_masked(self, window: Window, out_shape: tuple[int, int] | None = None,
                           resampling: Resampling = Resampling.average) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (h, w, 3) and validity (h, w) for an integer pixel ``window`` inside the raster.

        ``out_shape`` (h, w) resamples (``average`` by default, for downsampled tiles); nodata
        pixels are already painted with :data:`PAD_COLOUR`.
        """
        window = self._check_window(window)
        shape = out_shape or (window.height, window.width)
        resampling = resampling if shape != (window.height, window.width) else Resampling.nearest
        values, valid = self._read_values(window, shape, resampling)
        rgb = self.stretch.apply(values)
        return _paint(rgb, valid), _any_valid(valid)

    def read_window(self, window: Window, out_shape: tuple[int, int] | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a pixel ``window`` (nodata painted with :data:`PAD_COLOUR`)."""
        return self.read_window_masked(window, out_shape)[0]

    def thumbnail_geometry(self, size: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) where the image sits inside the ``size`` x ``size`` padded thumbnail."""
        longest = max(self.width, self.height)
        width = max(1, round(self.width * size / longest))
        height = max(1, round(self.height * size / longest))
        x0, y0 = (size - width) // 2, (size - height) // 2
        return x0, y0, x0 + width, y0 + height

    def read_thumbnail(self, size: int) -> np.ndarray:
        """The whole image fitted into a ``size`` x ``size`` uint8 (size, size, 3) square.

        The image keeps its aspect ratio and is centred; the rest is :data:`PAD_COLOUR`. It is
        resized from the preview read when that is large enough, else read again decimated.
        """
        x0, y0, x1, y1 = self.thumbnail_geometry(size)
        preview_h, preview_w = self._preview_rgb.shape[:2]
        if x1 - x0 <= preview_w and y1 - y0 <= preview_h:
            content = self._preview_rgb
        else:
            content = self.read_window(Window(0, 0, self.width, self.height), (y1 - y0, x1 - x0))
        image = Image.fromarray(content).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        canvas[:] = PAD_COLOUR
        canvas[y0:y1, x0:x1] = np.asarray(image)
        return canvas

    # -- description -----------------------------------------------------------------------------
    @property
    def format_name(self) -> str:
        return SUPPORTED_DRIVERS.get(self.driver, self.driver)

    @property
    def crs_text(self) -> str | None:
        return self.crs.to_string() if self.crs is not None else None

    def describe(self) -> dict:
        """JSON-able facts about the raster."""
        return {
            "path": str(self.path),
            "format": self.format_name,
            "width": self.width,
            "height": self.height,
            "band_count": self.count,
            "bands_used": list(self.bands),
            "band_note": self.band_note,
            "dtype": self.dtype,
            "nodata": _json_number(self.nodata),
            "crs": self.crs_text,
            "georeferenced": self.georeferenced,
            "georeference_note": self.georeference_note,
            "transform": list(self.transform)[:6],
            "block_shape": list(self.block_shape),
            "read_strategy": "strip by strip (sequential format)" if self.sequential else "window by window",
            "stretch": self.stretch.to_dict(),
        }

    def close(self) -> None:
        if self._dataset is not None and not self._dataset.closed:
            self._dataset.close()
        self._dataset = None

    def __enter__(self) -> Raster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Raster({str(self.path)!r}, {self.width}x{self.height}, {self.count} bands {self.dtype}, "
                f"crs={self.crs_text}, bands={self.bands})")


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/infinity: those become strings."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _window_text(window: Window) -> str:
    return (f"x {window.col_off}..{window.col_off + window.width}, "
            f"y {window.row_off}..{window.row_off + window.height}")


def _any_valid(valid: np.ndarray) -> np.ndarray:
    """A pixel is nodata only when every chosen band is masked there: (3, h, w) -> (h, w)."""
    return valid.any(axis=0)


def _paint(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(3, h, w) uint8 + validity -> (h, w, 3) uint8 with nodata pixels in :data:`PAD_COLOUR`."""
    image = np.ascontiguousarray(np.moveaxis(rgb, 0, -1))  # (3, h, w) -> (h, w, 3)
    pixel_valid = valid if valid.ndim == 2 else _any_valid(valid)
    if not pixel_valid.all():
        image[~pixel_valid] = PAD_COLOUR
    return image


def open_raster(path: str | os.PathLike, bands: tuple[int, int, int] | None = None,
                stretch: StretchMode = "auto") -> Raster:
    """Open ``path`` for windowed RGB reads; raises :class:`RasterInputError` for unusable input.

    ``bands``: three 1-based band indexes shown as R, G, B (default: the file's RGB bands, or 1, 2, 3;
    a 1-band image is grey). ``stretch``: ``auto`` keeps 8-bit data as is and stretches anything
    else from its 2-98 % percentiles; ``percentile`` stretches 8-bit data too.
    """
    return Raster(path, bands=bands, stretch=stretch)
