"""``longllava inspect``: what a CT study or a raster looks like to the suite, or why it cannot be read."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what a CT study (NIfTI / DICOM folder or .zip) or a raster (GeoTIFF, PNG, JPEG) loads as",
        description="Load a CT study or a raster the way the apps and the model see it and report it: "
        "series chosen, slices, spacing, HU range and windows for CT; size, bands, dtype, CRS, grid, "
        "tile count and level for rasters. Patient identifiers are never shown.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ct", metavar="PATH", help="NIfTI file, DICOM folder or .zip of a DICOM series")
    source.add_argument("--geotiff", metavar="PATH", help="GeoTIFF/COG, or PNG/JPEG/TIFF without georeference")
    parser.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID to load (default: largest CT series)")
    parser.add_argument("--max-tiles", type=int, default=None, help="tile budget for rasters (default: tiler's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from longllava.cli import print_json

    if args.ct:
        from domain_data.medical.inspect import format_ct_report, inspect_ct

        report = inspect_ct(args.ct, series_uid=args.series)
        text = format_ct_report(report)
    else:
        from domain_data.remote_sensing.inspect import format_raster_report, inspect_raster

        report = inspect_raster(args.geotiff, max_tiles=args.max_tiles)
        text = format_raster_report(report)
    if args.json:
        print_json(report)
    else:
        print(text)
    return 0
