"""Where is a scene's object place lost: in its tiles' tokens, or on the way to the answer?

``python -m finetune.place_probe --model M --train build/synthetic --data build/synthetic`` asks, for the
first ``--n-train`` training scenes (``rs_train_scenes.jsonl``) and the first ``--limit`` held-out scenes
(``rs_test_scenes.jsonl``) of a synthetic build, the row question of every object kind the scene holds
("Which row of tiles (1 = top) contains ships? ...", as ``longllava evaluate fit-rsfg`` asks it), and keeps,
for every layer of the language model, the answer position's hidden state (the last prompt token) and each
tile's token mean. Per layer it fits logistic probes on the training scenes and scores them on the
held-out ones:

* ``answer row`` / ``answer column``: the true row / column of the asked kind from the answer position
  (accuracy; the majority answer's beside it). Where these are high the answer has the place and the
  readout drops it; where they are at the majority answer the place never reached the answer;
* ``tile <kind>``: whether a tile holds the kind, from the tile's tokens (ROC AUC): does the language
  model still see the objects in the tiles?
* ``tile row`` / ``tile column``: a tile's own row / column from its tokens (accuracy): does a tile's
  state know where in the grid it is? (The protocol gives it only the tile's place in the sequence.)

A row answer needs both: tiles that know what they hold and where they are, and a step that carries the
place of the tile holding the asked kind to the answer (the demo model's training history, item 38).
Writes ``place_probe.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domain_data.synthetic.qa import SCENE_ROW_QUESTION
from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS
from finetune.layer_probe import PROBE_C
from finetune.vision_probe import SCENES_FILE, _table, write_probe_result

RESULT_FILE = "place_probe.json"
TRAIN_SCENES_FILE = "rs_train_scenes.jsonl"


def read_scenes(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` scenes of a ``rs_*_scenes.jsonl``."""
    from finetune import FinetuneError

    if not path.is_file():
        raise FinetuneError(f"{path} is missing; pass a synthetic build folder (python -m finetune.demo_data)")
    scenes = [json.loads(line) for line in path.open() if line.strip()][:limit]
    if not scenes:
        raise FinetuneError(f"{path}: no scenes")
    return scenes


def scene_places(scene: dict[str, Any]) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
    """The scene's grid (rows, cols) and, per kind it holds, the (row, col) of its tile (1-based; the
    generator clusters a kind in one tile)."""
    truth = scene["ground_truth"]
    places: dict[str, tuple[int, int]] = {}
    for obj in truth["objects"]:
        places.setdefault(obj["kind"], (int(obj["tile"][0]), int(obj["tile"][1])))
    return (int(truth["grid"]["rows"]), int(truth["grid"]["cols"])), places


def question_record(scene: dict[str, Any], kind: str, root: Path) -> dict[str, Any]:
    """A FIT-RSFG benchmark line asking ``kind``'s row (the answer is not used); the image made absolute."""
    return {"question_id": f"{scene['id']}_{kind.replace(' ', '_')}", "image": str((root / scene["image"]).resolve()),
            "layout": "grid", "category": "row", "ground_truth": "?",
            "question": SCENE_ROW_QUESTION.format(plural=PLURALS[kind])}


def tile_blocks(n_image_tokens: int, tokens_per_image: int, grid: tuple[int, int], where: str) -> int:
    """Index of the first tile's block among the image blocks (1 after a thumbnail, else 0)."""
    from finetune import FinetuneError

    tiles = grid[0] * grid[1]
    blocks, rest = divmod(n_image_tokens, tokens_per_image)
    if rest or blocks not in (tiles, tiles + 1):
        raise FinetuneError(f"{where}: {n_image_tokens} image tokens are not {tiles} tiles (+1 thumbnail) of "
                            f"{tokens_per_image}; render the scene at the tile size it was made for")
    return blocks - tiles


def scene_states(model: Any, processor: Any, scenes: Sequence[dict[str, Any]], root: Path, render: dict,
                 work: Path, cache: Path, split: str) -> dict[str, Any]:
    """Hidden states of every (scene, asked kind): the answer position per layer ``(questions, layers, H)``
    and, from each scene's first question, every tile's token mean ``(tiles, layers, H)`` with its labels."""
    import torch
    from tqdm import tqdm

    from finetune.evaluate import item_prompt, load_fitrsfg_items

    questions = [(scene, kind) for scene in scenes for kind in OBJECT_KINDS if kind in scene_places(scene)[1]]
    bench = work / f"{split}_questions.jsonl"
    bench.write_text("".join(json.dumps(question_record(s, k, root)) + "\n" for s, k in questions))
    items = load_fitrsfg_items(str(bench), render)
    image_token, per_image = model.config.image_token_id, int(model.config.image_seq_length)
    answer, answer_place, tiles, tile_labels = [], [], [], []
    seen: set[str] = set()
    for (scene, kind), item in tqdm(list(zip(questions, items)), desc=f"{split} scenes", unit="question"):
        prompt, images = item_prompt(item, cache)
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**inputs, output_hidden_states=True).hidden_states
        grid, places = scene_places(scene)
        answer.append(torch.stack([h[0, -1] for h in hidden]).float().numpy())
        answer_place.append(places[kind])
        if scene["id"] in seen:
            continue
        seen.add(scene["id"])
        image_states = torch.stack([h[0][inputs["input_ids"][0] == image_token] for h in hidden])  # (L+1, N, H)
        first = tile_blocks(image_states.shape[1], per_image, grid, item.record.where)
        for index in range(grid[0] * grid[1]):
            start = (first + index) * per_image
            tiles.append(image_states[:, start:start + per_image].mean(1).float().numpy())  # (L+1, H)
            row, col = divmod(index, grid[1])  # tiles row by row from the top-left
            tile_labels.append({"row": row + 1, "col": col + 1,
                                **{name: places.get(name) == (row + 1, col + 1) for name in OBJECT_KINDS}})
    return {"answer": np.stack(answer), "answer_place": np.array(answer_place), "tiles": np.stack(tiles),
            "tile_labels": tile_labels}


def _standardised(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    return scaler.transform(train_x), scaler.transform(test_x)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
                   ) -> tuple[float | None, float]:
    """Held-out accuracy of a multinomial logistic probe (None with one class in training) and of the
    training set's majority class."""
    from sklearn.linear_model import LogisticRegression

    values, counts = np.unique(train_y, return_counts=True)
    majority = float(np.mean(test_y == values[np.argmax(counts)]))
    if len(values) < 2:
        return None, majority
    train_z, test_z = _standardised(train_x, test_x)
    classifier = LogisticRegression(C=PROBE_C, max_iter=2000).fit(train_z, train_y)
    return float(np.mean(classifier.predict(test_z) == test_y)), majority


def probe_auc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float | None:
    """Held-out ROC AUC of a binary logistic probe (:func:`finetune.layer_probe.probe_aucs`, one column);
    None where a split has one class only."""
    from finetune.layer_probe import probe_aucs

    return probe_aucs(train_x, train_y[:, None], test_x, test_y[:, None])[0]


def layer_figures(train: dict[str, Any], test: dict[str, Any], layer: int) -> dict[str, Any]:
    """Every probe of the module docstring at one layer (0 = the embeddings)."""
    figures: dict[str, Any] = {}
    for axis, name in ((0, "row"), (1, "column")):
        accuracy, majority = probe_accuracy(train["answer"][:, layer], train["answer_place"][:, axis],
                                            test["answer"][:, layer], test["answer_place"][:, axis])
        figures[f"answer {name}"], figures[f"answer {name} majority"] = accuracy, majority
    for key, name in (("row", "row"), ("col", "column")):
        labels = [np.array([t[key] for t in split["tile_labels"]]) for split in (train, test)]
        figures[f"tile {name}"], figures[f"tile {name} majority"] = probe_accuracy(
            train["tiles"][:, layer], labels[0], test["tiles"][:, layer], labels[1])
    for kind in OBJECT_KINDS:
        holds = [np.array([t[kind] for t in split["tile_labels"]]) for split in (train, test)]
        figures[f"tile {kind}"] = probe_auc(train["tiles"][:, layer], holds[0], test["tiles"][:, layer], holds[1])
    return figures


def place_probe(model_path: str, train_data: str | Path, data: str | Path, n_train: int = 200, limit: int = 40,
                work_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Per layer, the probes of the module docstring. ``work_dir`` gets the question files; ``cache_dir``
    (default: inside ``work_dir``) the rendered scenes."""
    from finetune.evaluate import model_render_defaults
    from finetune.merge import load_trained
    from finetune.train import install_fast_scan_if_available

    work = Path(work_dir) if work_dir is not None else Path(data) / "place_probe_work"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else work / "image_cache"
    splits = {"train": (read_scenes(Path(train_data) / TRAIN_SCENES_FILE, n_train), Path(train_data)),
              "test": (read_scenes(Path(data) / SCENES_FILE, limit), Path(data))}
    install_fast_scan_if_available()
    model, processor = load_trained(model_path)
    render = model_render_defaults(model_path)
    states = {split: scene_states(model, processor, scenes, root, render, work, cache, split)
              for split, (scenes, root) in splits.items()}
    layers = [layer_figures(states["train"], states["test"], layer) for layer in range(states["train"]["answer"].shape[1])]
    return {"model": str(model_path), "train_data": str(train_data), "data": str(data),
            "n_train_scenes": len(splits["train"][0]), "n_test_scenes": len(splits["test"][0]),
            "n_train_questions": len(states["train"]["answer"]), "n_test_questions": len(states["test"]["answer"]),
            "n_test_tiles": len(states["test"]["tiles"]), "layers": layers}


def format_table(result: dict[str, Any]) -> str:
    columns = ["answer row", "answer column", "tile row", "tile column", *(f"tile {kind}" for kind in OBJECT_KINDS)]
    rows = [[index, *(layer[c] for c in columns)] for index, layer in enumerate(result["layers"])]
    first = result["layers"][0]
    majority = ["majority", *(first.get(f"{c} majority") for c in columns[:4]), None, None, None]
    lines = _table(["layer", *columns], [*rows, majority])
    lines.append(f"(layer 0 = embeddings; probes fit on {result['n_train_questions']} questions / the tiles of "
                 f"{result['n_train_scenes']} training scenes, scored on {result['n_test_questions']} questions / "
                 f"{result['n_test_tiles']} tiles of {result['n_test_scenes']} held-out scenes; rows and columns: "
                 "accuracy, tile kinds: ROC AUC)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.place_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or 'demo')")
    parser.add_argument("--train", default="build/synthetic", help=f"build with {TRAIN_SCENES_FILE}")
    parser.add_argument("--data", required=True, help=f"build with {SCENES_FILE} (held-out)")
    parser.add_argument("--n-train", type=int, default=200, help="training scenes to fit on (default 200)")
    parser.add_argument("--limit", type=int, default=40, help="held-out scenes to score (default 40)")
    parser.add_argument("--cache-dir", help="image cache for the rendered scenes (default: a folder beside "
                        "place_probe.json)")
    parser.add_argument("--out", help="folder for place_probe.json (default: the model folder's parent)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    result = place_probe(args.model, args.train, args.data, args.n_train, args.limit,
                         work_dir=out / "place_probe_work", cache_dir=args.cache_dir)
    write_probe_result(out, RESULT_FILE, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
