"""Tiling a giant GeoTIFF: time and peak memory for thumbnail + all tiles under a tile budget.

Writes seeded synthetic 3-band uint16 tiled GeoTIFFs (UTM, nodata border) of several sizes, then,
for each, runs one fresh child process that opens the raster, computes the stretch, makes the
thumbnail and reads every tile (converting each to a NumPy array and folding it into a checksum).
The parent measures the child's peak RSS (``wait4`` rusage) and wall time and prints the sizes side
by side, with ratios to the first size: peak RSS must not grow with raster size.

    .venv/bin/python benchmarks/bench_tiling.py                   # 10,000 and 20,000 px, 1000 tiles
    .venv/bin/python benchmarks/bench_tiling.py --sizes 5000 20000 --max-tiles 1000

Targets (issue 5): 20,000 x 20,000 -> thumbnail + tiles for a 1000-tile budget in <= 60 s with
peak RSS <= 1.5 GB on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BLOCK = 512
TARGET_SECONDS = 60.0
TARGET_RSS_MB = 1536.0


def write_synthetic_geotiff(path: Path, size: int, seed: int = 0) -> None:
    """A ``size`` x ``size`` 3-band uint16 tiled GeoTIFF, written strip by strip (bounded memory).

    Content: smooth per-band gradients plus seeded noise, a nodata (0) frame 37 px wide.
    """
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", tiled=True,
                   blockxsize=BLOCK, blockysize=BLOCK, crs="EPSG:32633", nodata=0, BIGTIFF="IF_SAFER",
                   transform=from_origin(400000.0, 5000000.0, 0.5, 0.5))
    x = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]  # (1, size)
    with rasterio.open(path, "w", **profile) as dst:
        for row0 in range(0, size, BLOCK):
            height = min(BLOCK, size - row0)
            y = (np.arange(row0, row0 + height, dtype=np.float32) / size)[:, None]  # (height, 1)
            strip = np.empty((3, height, size), dtype=np.uint16)
            for band in range(3):
                base = 2000.0 + 6000.0 * (0.5 + 0.5 * np.sin(6.0 * x * (band + 1) + 4.0 * y))
                noise = rng.integers(0, 500, size=(height, size), dtype=np.uint16)
                strip[band] = base.astype(np.uint16) + noise
            strip[:, :, :37] = 0
            strip[:, :, size - 37:] = 0
            if row0 < 37:
                strip[:, : 37 - row0, :] = 0
            if row0 + height > size - 37:
                strip[:, max(0, size - 37 - row0):, :] = 0
            dst.write(strip, window=rasterio.windows.Window(0, row0, size, height))


def child_main(path: str, max_tiles: int, import_only: bool) -> None:
    """Runs in a fresh process: tile ``path`` and print one JSON line of results."""
    sys.path.insert(0, str(REPO))
    import rasterio  # noqa: F401  (import cost is part of the baseline)
    from PIL import Image  # noqa: F401

    from domain_data.remote_sensing.tiling import tile_image

    if import_only:
        print(json.dumps({"import_only": True}))
        return
    start = time.perf_counter()
    tiled = tile_image(path, max_tiles=max_tiles)
    planned = time.perf_counter() - start
    checksum = int(np.asarray(tiled.thumbnail).sum())
    count = 0
    for tile in tiled.tiles:
        checksum = (checksum + int(np.asarray(tile, dtype=np.uint64).sum())) % (2**61)
        count += 1
    elapsed = time.perf_counter() - start
    tiled.close()
    print(json.dumps({"seconds": elapsed, "open_and_thumbnail_seconds": planned, "tiles": count,
                      "grid": list(tiled.grid), "scale": tiled.scale, "checksum": checksum}))


def run_child(path: Path | None, max_tiles: int, import_only: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", str(path or ""), "--max-tiles", str(max_tiles)]
    if import_only:
        command.append("--import-only")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed for {path}:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # Linux: kilobytes
    result["process_wall_seconds"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--max-tiles", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the GeoTIFFs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the written GeoTIFFs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--import-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args.child, args.max_tiles, args.import_only)
        return 0

    sys.path.insert(0, str(REPO))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    workdir.mkdir(parents=True, exist_ok=True)
    baseline = run_child(None, args.max_tiles, import_only=True)
    rows = []
    for size in args.sizes:
        path = workdir / f"synthetic_{size}.tif"
        start = time.perf_counter()
        write_synthetic_geotiff(path, size)
        written = time.perf_counter() - start
        result = run_child(path, args.max_tiles)
        result.update(size=size, file_gb=path.stat().st_size / 1e9, write_seconds=written)
        rows.append(result)
        if not args.keep:
            path.unlink()
    print(f"baseline (python + numpy + rasterio + PIL + suite imports): peak RSS {baseline['peak_rss_mb']:.0f} MB")
    header = (f"{'size (px)':>13} {'file GB':>8} {'grid':>8} {'scale':>5} {'tiles':>6} {'open+thumb s':>12} "
              f"{'total s':>8} {'peak RSS MB':>11} {'RSS ratio':>9} {'pixels ratio':>12}")
    print(header)
    first = rows[0]
    for row in rows:
        grid = f"{row['grid'][0]}x{row['grid'][1]}"
        print(f"{row['size']:>6}x{row['size']:<6} {row['file_gb']:>8.2f} {grid:>8} {row['scale']:>5} "
              f"{row['tiles']:>6} {row['open_and_thumbnail_seconds']:>12.1f} {row['seconds']:>8.1f} "
              f"{row['peak_rss_mb']:>11.0f} {row['peak_rss_mb'] / first['peak_rss_mb']:>9.2f} "
              f"{(row['size'] / first['size']) ** 2:>12.2f}")
    last = rows[-1]
    ok = last["seconds"] <= TARGET_SECONDS and last["peak_rss_mb"] <= TARGET_RSS_MB
    print(f"target for {last['size']} px: <= {TARGET_SECONDS:.0f} s and <= {TARGET_RSS_MB:.0f} MB peak RSS -> "
          f"{'met' if ok else 'NOT met'} ({last['seconds']:.1f} s, {last['peak_rss_mb']:.0f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
