"""`longllava bench gpu` as a script: same code (longllava/bench.py), same options, same output.

    .venv/bin/python benchmarks/bench_gpu.py --help
"""

from __future__ import annotations

import sys

from longllava.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "gpu", *sys.argv[1:]]))
