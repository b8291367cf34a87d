"""``longllava inspect --geotiff PATH``: what a raster looks like to the suite, without reading tiles."""

from __future__ import annotations

import os

from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from domain_data.remote_sensing.tiling import DEFAULT_MAX_TILES, tile_image


def inspect_raster(path: str | os.PathLike, max_tiles: int | None = None) -> dict:
    """JSON-able report: size, bands, dtype, CRS, georeference, stretch, grid, tile count, level chosen.

    Opens the raster and plans the grid (one decimated read for the stretch and the thumbnail);
    tiles are not read. Raises :class:`RasterInputError` for unusable input.
    """
    with tile_image(path, max_tiles=max_tiles or DEFAULT_MAX_TILES) as tiled:
        report = tiled.raster.describe()
        report.update(tiled.describe())
        if tiled.georeferenced:
            whole = Window(0, 0, tiled.plan.width, tiled.plan.height)
            bounds = [float(v) for v in window_bounds(whole, tiled.raster.transform)]
            report["bounds"] = bounds
            report["lonlat_bounds"] = [float(v) for v in transform_bounds(tiled.raster.crs, "EPSG:4326", *bounds)]
    return report


def format_raster_report(report: dict) -> str:
    """The report as a few lines of text."""
    stretch = report["stretch"]
    if stretch["kind"] == "percentile":
        lows = ", ".join(f"{v:g}" for v in stretch["low"])
        highs = ", ".join(f"{v:g}" for v in stretch["high"])
        stretch_text = f"2-98 % percentile stretch (low {lows}; high {highs})"
    else:
        stretch_text = {"identity": "none (8-bit data)", "palette": "colour palette"}[stretch["kind"]]
    level = report["level"]
    rows, cols = report["grid"]
    lines = [
        f"file:        {report['path']} ({report['format']})",
        f"size:        {report['width']} x {report['height']} px, {report['band_count']} band(s), {report['dtype']}",
        f"bands:       {report['band_note']}",
        f"nodata:      {report['nodata']}",
        f"crs:         {report['crs'] or 'none'} ({report['georeference_note']})",
        f"stretch:     {stretch_text}",
        f"reading:     {report['read_strategy']}",
        f"grid:        {rows} rows x {cols} columns = {report['tile_count']} tiles of {report['tile_size']} px "
        f"(+1 thumbnail), budget {report['max_tiles']}",
        f"level:       {level['note']}",
        "padding:     " + ", ".join(f"{k} {v}" for k, v in report["padding"].items()) + " px (centred)",
    ]
    if "bounds" in report:
        lines.append("bounds:      " + ", ".join(f"{v:.10g}" for v in report["bounds"]) + " (left, bottom, right, top)")
        lines.append("lon/lat:     " + ", ".join(f"{v:.6f}" for v in report["lonlat_bounds"])
                     + " (west, south, east, north)")
    return "\n".join(lines)
