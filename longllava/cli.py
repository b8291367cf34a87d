"""The ``longllava`` command line.

Each package contributes its subcommands through a ``register(subparsers)`` function in its own
``cli`` module, listed in :data:`COMMAND_MODULES`; this file is the composition root and the only
place where the packages meet. Register functions must stay cheap: heavy imports (torch, gradio,
rasterio) happen inside the command functions, so ``longllava --help`` is instant.

A command function takes the parsed ``argparse.Namespace`` and returns an exit code (or None for 0).
Bad user input raises :class:`longllava.errors.UserInputError`: printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

from longllava.errors import UserInputError

COMMAND_MODULES: tuple[str, ...] = (
    "longllava.commands",
    "longllava.bench",
    "domain_data.cli",
    "finetune.cli",
    "apps.cli",
)


def print_json(payload: object) -> None:
    """Machine-readable output for ``--json``: one JSON document on stdout."""
    print(json.dumps(payload, indent=2, sort_keys=False, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longllava",
        description="LongLLaVA domain suite: CT studies and giant satellite images with a hybrid "
        "Mamba/Transformer multimodal model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
            continue
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(subparsers)
    return parser


def _take_local_rank(argv: Sequence[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` that the deepspeed launcher inserts; keep it in LOCAL_RANK."""
    kept: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--local_rank=") or item.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", item.split("=", 1)[1])
        elif item in ("--local_rank", "--local-rank") and i + 1 < len(items):
            os.environ.setdefault("LOCAL_RANK", items[i + 1])
            i += 1
        else:
            kept.append(item)
        i += 1
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_take_local_rank(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if os.environ.get("LONGLLAVA_CLI_DEBUG"):
        print(f"[debug] command {args.command} returned {code}", file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
