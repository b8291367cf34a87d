"""`longllava bench train` as a script: same code (longllava/bench.py), same options, same output.

    .venv/bin/python benchmarks/bench_train.py --help
"""

from __future__ import annotations

import sys

from longllava.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
