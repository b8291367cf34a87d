"""Benchmark: a 300-slice 512x512 uncompressed DICOM series -> 3-channel 336 px slices.

Target (issue 4): <= 5 s wall time and <= 2 GB peak RSS on the 2-core CPU machine. The series is
seeded synthetic (domain_data.synthetic.dicom_writer) and written to a temporary folder first; only
loading (pydicom, HU, orientation) plus slicing (windowing, resize) is timed. Prints each stage, the
total against the target as a ratio, and the peak RSS (ru_maxrss of this process).

Run:  .venv/bin/python benchmarks/bench_ct_slices.py [--slices 300] [--size 512] [--repeat 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

from domain_data.medical.ct import load_ct
from domain_data.medical.slices import ct_to_slices
from domain_data.synthetic.ct_phantom import phantom_hu
from domain_data.synthetic.dicom_writer import write_ct_series

TARGET_SECONDS = 5.0
TARGET_RSS_GB = 2.0


def peak_rss_gb() -> float:
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, this process only
    return kilobytes / 1024**2


def write_series(folder: Path, slices: int, size: int) -> None:
    hu = phantom_hu(slices, size, size, seed=0)
    write_ct_series(hu, (1.0, 0.7, 0.7), folder, shuffle_files=True, seed=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each DICOM slice")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs (the best is reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_ct_") as scratch:
        folder = Path(scratch) / "series"
        writer = multiprocessing.get_context("spawn").Process(  # keeps the writer's memory out of our RSS
            target=write_series, args=(folder, args.slices, args.size))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit("writing the synthetic series failed")
        print(f"series: {args.slices} x {args.size} x {args.size} 16-bit, uncompressed, shuffled file names")
        best_load = best_slice = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            volume = load_ct(folder)
            loaded = time.perf_counter()
            slices = ct_to_slices(volume, window="multi", size=336)
            done = time.perf_counter()
            best_load, best_slice = min(best_load, loaded - start), min(best_slice, done - loaded)
            del volume
        total = best_load + best_slice
        print(f"output: {len(slices)} RGB images {slices.images[0].size}, {slices.resampled}")
        print(f"load_ct      {best_load:6.2f} s")
        print(f"ct_to_slices {best_slice:6.2f} s")
        print(f"total        {total:6.2f} s   target {TARGET_SECONDS:.1f} s   ratio target/measured "
              f"{TARGET_SECONDS / total:.2f}x")
        rss = peak_rss_gb()
        print(f"peak RSS     {rss:6.2f} GB  target {TARGET_RSS_GB:.1f} GB  ratio target/measured "
              f"{TARGET_RSS_GB / rss:.2f}x (load + slices; the series is written by a child process)")
    return 0 if total <= TARGET_SECONDS and rss <= TARGET_RSS_GB else 1


if __name__ == "__main__":
    sys.exit(main())
