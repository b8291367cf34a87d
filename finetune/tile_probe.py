"""Does a model read a single satellite tile's objects, before any whole-scene question?

``python -m finetune.tile_probe --model M --data build/heldout20`` renders the first ``--limit`` held-out
scenes of a synthetic build (``rs_test_scenes.jsonl``) as the demo recipes do, asks the warm-up stage's tile
question (``finetune.demo_data.TILE_QUESTION``: "How many ships, storage tanks and buildings does this tile
show?") about every tile on its own, and scores the answers against the tiles' true counts
(``finetune.demo_data.tile_counts_answer``): how many tiles are answered exactly, empty and non-empty apart
(most tiles are empty, so the first figure hides a model that answers "0, 0, 0" to all of them), and per
object kind, over the tiles that hold it, how often its count is exact, how often it is named at all (a
count above 0) and the mean absolute error. A scene's count, row, column and tile answers need this reading
first (the demo model's training history, item 32: the shipped stage 2 answered "0, 0, 0" for every
non-empty held-out tile). Writes ``tile_probe.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.vision_probe import (
    SCENES_FILE,
    _cell,
    _table,
    add_render_arguments,
    rendered_scene_tiles,
    write_probe_result,
)

RESULT_FILE = "tile_probe.json"


def parse_tile_answer(answer: str, plurals: Sequence[str]) -> list[int | None]:
    """Each kind's count in an answer like ``"ships 2, storage tanks 0, buildings 1"`` (``plurals`` in
    order); ``None`` where the answer does not name the kind with a number."""
    counts: list[int | None] = []
    for plural in plurals:
        found = re.search(rf"\b{re.escape(plural)}\s+(\d+)", answer)
        counts.append(int(found.group(1)) if found else None)
    return counts


def tile_scores(truth: np.ndarray, read: Sequence[Sequence[int | None]], kinds: Sequence[str]) -> dict[str, Any]:
    """Figures of ``(tiles, kinds)`` true counts against the counts read (:func:`parse_tile_answer`; a
    missing count is wrong and, for the error, read as 0)."""
    got = np.array([[-1 if c is None else c for c in row] for row in read], dtype=int).reshape(truth.shape)
    exact_tile = np.all(got == truth, axis=1)
    empty = truth.sum(axis=1) == 0
    per_kind = {}
    for j, kind in enumerate(kinds):
        holds = truth[:, j] > 0
        per_kind[kind] = {
            "tiles_with": int(holds.sum()),
            "exact": float(np.mean(got[holds, j] == truth[holds, j])) if holds.any() else None,
            "named": float(np.mean(got[holds, j] > 0)) if holds.any() else None,
            "mean_abs_error": float(np.mean(np.abs(np.maximum(got[holds, j], 0) - truth[holds, j])))
            if holds.any() else None,
            "named_where_absent": int(np.sum(got[~holds, j] > 0)),
        }
    return {"tiles": int(len(truth)), "exact": float(exact_tile.mean()) if len(truth) else None,
            "empty_tiles": int(empty.sum()), "empty_exact": float(exact_tile[empty].mean()) if empty.any() else None,
            "non_empty_tiles": int((~empty).sum()),
            "non_empty_exact": float(exact_tile[~empty].mean()) if (~empty).any() else None,
            "kinds": per_kind}


def probe_tiles(model_dir: str | Path, data: str | Path, render: dict[str, Any], cache_dir: str | Path,
                limit: int | None = 20) -> dict[str, Any]:
    """Ask the tile question about every tile of ``data``'s first ``limit`` held-out scenes."""
    from PIL import Image
    from tqdm import tqdm

    from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS
    from finetune import FinetuneError
    from finetune.demo_data import TILE_QUESTION, tile_object_counts
    from longllava.loading import load_model
    from longllava.session import LongContextSession

    scenes_path = Path(data) / SCENES_FILE
    if not scenes_path.is_file():
        raise FinetuneError(f"{scenes_path} is missing: give a synthetic build with held-out scenes "
                            "(python -m finetune.demo_data, or build_heldout_subset)")
    model, processor = load_model(model_dir)
    model.eval()
    session = LongContextSession(model, processor)
    plurals = [PLURALS[kind] for kind in OBJECT_KINDS]
    truth, read, answers = [], [], []
    lines = scenes_path.read_text().splitlines()[:limit]
    for number, line in enumerate(tqdm(lines, desc="probe tiles", unit="scene"), start=1):
        scene = json.loads(line)
        for path, row, col in rendered_scene_tiles(data, scene, render, cache_dir, f"{scenes_path}:{number}"):
            with Image.open(path) as image:
                answer = session.generate([{"role": "user", "content": f"<image>\n{TILE_QUESTION}"}],
                                          [image.convert("RGB")], max_new_tokens=24).strip()
            truth.append(tile_object_counts(scene["ground_truth"]["objects"], row, col))
            read.append(parse_tile_answer(answer, plurals))
            answers.append({"scene": scene["id"], "row": row, "col": col, "answer": answer})
    result = tile_scores(np.array(truth, dtype=int).reshape(-1, len(OBJECT_KINDS)), read, list(OBJECT_KINDS))
    return {"model": str(model_dir), "data": str(data), "scenes": len(lines), **result, "answers": answers}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"tile probe of {result['model']} on {result['scenes']} scenes of {result['data']}: "
             f"{result['tiles']} tiles, exact {_cell(result['exact'])}; empty {result['empty_tiles']} "
             f"(exact {_cell(result['empty_exact'])}), non-empty {result['non_empty_tiles']} "
             f"(exact {_cell(result['non_empty_exact'])})"]
    lines += _table(("objects", "tiles with", "exact count", "named", "mean abs. error", "named where absent"),
                    [(kind, s["tiles_with"], s["exact"], s["named"], s["mean_abs_error"], s["named_where_absent"])
                     for kind, s in result["kinds"].items()])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m finetune.tile_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (e.g. build/demo_warmup/model)")
    parser.add_argument("--data", required=True, help="synthetic build folder with rs_test_scenes.jsonl")
    add_render_arguments(parser, "scenes")
    parser.add_argument("--out", default=None, help="folder for tile_probe.json (default: beside --model)")
    args = parser.parse_args(argv)
    result = probe_tiles(args.model, args.data, yaml.safe_load(args.render), args.cache_dir, args.limit)
    write_probe_result(args.out or Path(args.model).parent, RESULT_FILE, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
