"""Does a vision stage's tower see each CT finding, per image and per study? ROC AUC of its label head.

``python -m finetune.vision_probe --run build/demo_vision --data build/heldout20 --render '{...}'``
renders the first ``--limit`` studies of a synthetic build's held-out CT set (``ct_test_studies.jsonl``)
the way the recipes do (``--render``: sampled planes or ``window: slab``), runs stage 1's label head
(:func:`finetune.vision.label_probabilities`) on every image and scores, for each rendered finding:

* image level: the head's ``ct <finding>`` probability against whether the finding reaches the image
  (:func:`finetune.demo_data.rendered_slice_answers`), as stage 1 was trained;
* study level: the maximum and the mean of that probability over the study's images against whether the
  study has the finding -- what stage 3's presence questions need. A finding on 1-2 of 16 images needs
  an image-level detector with almost no false positives for the maximum to separate studies;
* study level, bag: the head pooled over every token of all the study's images at once (the study as a
  multiple-instance bag, :mod:`finetune.vision`), what a stage 1 trained on study bags optimises;
* cell level (slab renders of studies with a label map): each token's logit against whether the finding
  covers its cell of the pooled grid (:func:`finetune.demo_data.slab_token_labels`, what stage 1's token
  targets train): does the token that sees the finding carry it?
* side (findings with ``ct <finding> left`` / ``right`` labels): for each study with the finding, the side
  the head's two probabilities (max over the images) call against the true side (:func:`side_scores`), what
  the side questions need.

With a ``rs_test_scenes.jsonl`` beside the studies it also scores the first ``--limit`` held-out satellite
scenes, tile by tile (:func:`probe_scenes`): per object kind the tile AUC of ``tile <objects> >= 1``, the
cell AUC, how often the ordinal labels give a tile's exact count and their sum the scene's (the count a
count question asks), and how often the tile the head ranks first holds the kind (a tile question); and
``--needles`` fresh NIAH needle images beside as many haystack images (:func:`probe_needles`, a seed no
stage trains on): the needle-vs-haystack AUC, colour and shape accuracy (the head's best colour / shape
label), the needle's cell AUC. These bound what the language model can read off the tokens.

Writes ``vision_probe.json`` and prints a table. This is the check to run after stage 1, before spending
an hour on stages 2-3 (longllava/checkpoints/demo/TRAINING_HISTORY.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STUDIES_FILE = "ct_test_studies.jsonl"
SCENES_FILE = "rs_test_scenes.jsonl"
PROBE_NEEDLE_SEED = 500_000_000  # NIAH images for the probe: neither the training pool's (1e9 + seed) nor the evaluation's
PROBE_NEEDLES = 100


def auc_or_none(truth: Sequence[bool], score: Sequence[float]) -> float | None:
    """ROC AUC, or None when ``truth`` holds one class only."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, np.asarray(score, dtype=np.float64)))


def write_probe_result(out: str | Path, file_name: str, result: dict[str, Any], table: str) -> Path:
    """Save a probe's ``result`` as ``out/file_name`` (JSON) and print its ``table`` and where it went."""
    path = Path(out) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    print(f"wrote {path}")
    return path


def finding_scores(study_answers: Sequence[Sequence[str]], study_truth: Sequence[dict[str, Any]],
                   probabilities: Sequence[np.ndarray], label_index: dict[str, int],
                   bag_probabilities: Sequence[np.ndarray] | None = None,
                   cells: tuple[np.ndarray, dict[str, np.ndarray]] | None = None) -> dict[str, dict[str, Any]]:
    """Per rendered finding: image-level AUC and study-level AUC of the max / mean probability (and of
    the bag's, when given), and the cell-level AUC when ``cells`` is given.

    ``study_answers[i][k]`` is image k's :func:`slice_findings_answer` of study i, ``study_truth[i]`` the
    study's ``findings``, ``probabilities[i]`` its ``(images, labels)`` head probabilities and
    ``bag_probabilities[i]`` its ``(labels,)`` probabilities with the head pooled over all its images;
    ``cells`` is ``(token logits (tokens, labels), {label: (tokens,) bool})``: every token of every image
    scored, and whether the label's finding covers it."""
    from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS

    scores = {}
    for name in RENDERABLE_FINDINGS:
        label = f"ct {name.lower()}"
        if label not in label_index:
            continue
        column = label_index[label]
        on_image = [name.lower() in answer for answers in study_answers for answer in answers]
        image_score = np.concatenate([p[:, column] for p in probabilities])
        present = [bool(truth[name]["present"]) for truth in study_truth]
        scores[name] = {
            "studies_with": int(sum(present)),
            "images_with": int(sum(on_image)),
            "image_auc": auc_or_none(on_image, image_score),
            "study_auc_max": auc_or_none(present, [p[:, column].max() for p in probabilities]),
            "study_auc_mean": auc_or_none(present, [p[:, column].mean() for p in probabilities]),
        }
        if bag_probabilities is not None:
            scores[name]["study_auc_bag"] = auc_or_none(present, [p[column] for p in bag_probabilities])
        if cells is not None and label in cells[1]:
            scores[name]["cell_auc"] = auc_or_none(cells[1][label], cells[0][:, column])
        scores[name] |= side_scores(name, study_truth, probabilities, label_index)
    return scores


def head_side(left: float, right: float) -> str:
    """The side a study's ``left`` / ``right`` label probabilities (max over its images) say: ``both`` when
    both reach 0.5, else the larger one -- the answer set of the side questions."""
    return "both" if min(left, right) >= 0.5 else "left" if left > right else "right"


def side_scores(name: str, study_truth: Sequence[dict[str, Any]], probabilities: Sequence[np.ndarray],
                label_index: dict[str, int]) -> dict[str, Any]:
    """For the studies that have finding ``name`` with a side: how many, and how often :func:`head_side`
    of the head's ``ct <name> left`` / ``right`` probabilities (max over the study's images) is that side:
    what a side question needs from the tower. Empty when the head has no side labels for it."""
    labels = [f"ct {name.lower()} {side}" for side in ("left", "right")]
    if not all(label in label_index for label in labels):
        return {}
    left, right = (label_index[label] for label in labels)
    calls = [(truth[name]["side"], head_side(p[:, left].max(), p[:, right].max()))
             for truth, p in zip(study_truth, probabilities) if truth[name]["present"] and truth[name].get("side")]
    return {"studies_with_side": len(calls),
            "side_accuracy": sum(side == call for side, call in calls) / len(calls) if calls else None}


def _cell_targets(study: dict[str, Any], data: Path, render: dict[str, Any], count: int,
                  grid: int) -> list[dict[str, list[int]]] | None:
    """Per slab image of the study, each finding label -> the token cells it covers
    (:func:`finetune.demo_data.slab_token_labels`), or None when the study has no label map or the render is
    not slabs."""
    from domain_data.medical.slices import SLAB_WINDOW
    from domain_data.synthetic.ct_phantom import read_label_map
    from finetune.demo_data import slab_token_labels

    if render.get("window") != SLAB_WINDOW or "label_map" not in study:
        return None
    return slab_token_labels(study["ground_truth"], read_label_map(data / study["label_map"]), render, count, grid)


@dataclass
class ProbedHead:
    """A vision run's label head over its model's tower, the head's labels and the model's image processor."""

    run_dir: Path
    head: Any
    vocabulary: list[str]
    image_processor: Any

    @property
    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.vocabulary)}

    @property
    def canvas(self) -> int:
        """The tower's square input side (px)."""
        return int(self.head.vision_tower.config.image_size)

    def token_logits(self, images: Sequence[Any]) -> np.ndarray:
        """Image files or PIL images -> ``(images, pooled_grid**2, labels)`` per-token logits."""
        import torch
        from PIL import Image

        from finetune.data import processor_image_loader

        if all(isinstance(image, Image.Image) for image in images):
            pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        else:
            pixels = processor_image_loader(self.image_processor)(list(images))
        with torch.no_grad():
            return self.head.token_logits(pixels).numpy()


def open_run(run_dir: str | Path) -> ProbedHead:
    """Load a stage-'vision' run's ``model/`` and label head."""
    from finetune.vision import load_head
    from longllava.loading import load_model

    model, processor = load_model(Path(run_dir) / "model")
    head, vocabulary = load_head(model, run_dir)
    return ProbedHead(Path(run_dir), head, vocabulary, processor.image_processor)


def pooled_probabilities(token_logits: np.ndarray) -> np.ndarray:
    """``(images, t, L)`` token logits -> ``(images, L)`` probabilities with the head's pooling."""
    import torch

    from finetune.vision import log_mean_exp

    return torch.sigmoid(log_mean_exp(torch.from_numpy(token_logits), dim=1)).numpy()


def _cells(token_logits: Sequence[np.ndarray], targets: Sequence[dict[str, list[int]]], grid: int,
           label_index: dict[str, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every token of every image, flattened: ``(tokens, L)`` logits and, per label any image's targets
    name, ``(tokens,)`` whether the label covers the token's cell."""
    logits = np.concatenate([t.reshape(-1, t.shape[-1]) for t in token_logits])
    covered: dict[str, np.ndarray] = {}
    for k, image in enumerate(targets):
        for label, cells in image.items():
            if label in label_index:
                covered.setdefault(label, np.zeros(len(targets) * grid * grid, dtype=bool))
                covered[label][k * grid * grid + np.asarray(cells, dtype=int)] = True
    return logits, covered


def probe_ct(run: str | Path | ProbedHead, data: str | Path, render: dict[str, Any], cache_dir: str | Path,
             limit: int | None = 20) -> dict[str, Any]:
    """Score the label head of the vision run ``run`` (its ``model/`` and head) on ``data``'s studies."""
    import torch
    from tqdm import tqdm

    from finetune import FinetuneError
    from finetune.data import TrainingRecord, record_visuals
    from finetune.demo_data import rendered_slice_answers
    from finetune.vision import bag_logits, log_mean_exp

    studies_path = Path(data) / STUDIES_FILE
    if not studies_path.is_file():
        raise FinetuneError(f"{studies_path} not found: pass a synthetic build folder (python -m finetune.demo_data)")
    probed = run if isinstance(run, ProbedHead) else open_run(run)
    grid = probed.head.pooled_grid
    lines = studies_path.read_text().splitlines()[:limit]
    answers, truths, probabilities, bags, token_logits, cell_targets = [], [], [], [], [], []
    for number, line in enumerate(tqdm(lines, desc="probe studies", unit="study"), start=1):
        study = json.loads(line)
        record = TrainingRecord(study["id"], (), ct=Path(data) / study["image"], layout="series",
                                render=dict(render), where=f"{studies_path}:{number}")
        visuals = record_visuals(record, cache_dir)
        tokens = probed.token_logits(list(visuals.paths))  # (images, t, L)
        logits = log_mean_exp(torch.from_numpy(tokens), dim=1)  # (images, L): the head's pooling
        probabilities.append(torch.sigmoid(logits).numpy())
        bags.append(torch.sigmoid(bag_logits(logits)).numpy())
        answers.append(rendered_slice_answers(study["ground_truth"], render, len(visuals.paths)))
        truths.append(study["ground_truth"]["findings"])
        targets = _cell_targets(study, Path(data), render, len(visuals.paths), grid)
        if targets is not None:
            token_logits.append(tokens)
            cell_targets += targets
    label_index = probed.label_index
    cells = None
    if token_logits and len(token_logits) == len(lines):  # every study has its cells
        cells = _cells(token_logits, cell_targets, grid, label_index)
    return {"run": str(probed.run_dir), "data": str(data), "render": render, "studies": len(lines),
            "findings": finding_scores(answers, truths, probabilities, label_index, bags, cells)}


def level_columns(label_index: dict[str, int], prefix: str) -> list[int]:
    """The head's columns of the count levels ``<prefix> >= 1``, ``>= 2``, ... it has, in order."""
    return [label_index[f"{prefix} >= {k}"] for k in range(1, 100) if f"{prefix} >= {k}" in label_index]


def centre_counts(token_logits: np.ndarray, label_index: dict[str, int], plural: str) -> np.ndarray | None:
    """``(tiles, t, L)`` token logits -> ``(tiles,)`` counts of one object kind read off its per-cell centre
    labels (``tile <plural> centres >= k``): over every cell, how many of its k levels pass 0.5. None when
    the head has no such labels."""
    columns = level_columns(label_index, f"tile {plural} centres")
    if not columns:
        return None
    return (token_logits[..., columns] > 0).sum(axis=(1, 2))  # logit > 0: probability > 0.5


def _scene_count_accuracy(read: Sequence[np.ndarray], counts: Sequence[np.ndarray], kind: int) -> float:
    """How often the tile counts ``read`` per scene add up to the scene's true count of kind ``kind``."""
    return float(np.mean([r.sum() == c[:, kind].sum() for r, c in zip(read, counts, strict=True)]))


def object_scores(counts: Sequence[np.ndarray], probabilities: Sequence[np.ndarray], label_index: dict[str, int],
                  cells: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
                  token_logits: Sequence[np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Per object kind, from each scene's ``(tiles, kinds)`` true counts (kinds in
    ``domain_data.synthetic.satellite.OBJECT_KINDS`` order) and ``(tiles, L)`` head probabilities:

    * ``tile_auc``: ``tile <objects> >= 1`` against whether the tile holds the kind;
    * ``tile_count_accuracy``: the tile's count read as how many of its ``>= k`` labels pass 0.5, against
      the true count (capped at the largest k the head has); ``tile_count_accuracy_with``: the same over
      the tiles that hold the kind;
    * ``scene_count_accuracy``: those counts summed over the scene's tiles against the scene's count;
    * ``best_tile_accuracy``: over the scenes with the kind, whether the tile with the highest ``>= 1``
      probability holds it;
    * ``cell_auc`` (with ``cells``, as :func:`_cells` gives them): each token's ``>= 1`` logit against
      whether the kind covers its cell;
    * ``tile_count_accuracy_centres`` / ``scene_count_accuracy_centres`` (with each scene's ``(tiles, t, L)``
      ``token_logits`` and a head with per-cell centre labels): the same counts read by
      :func:`centre_counts`."""
    from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS

    scores = {}
    for j, kind in enumerate(OBJECT_KINDS):
        columns = level_columns(label_index, f"tile {PLURALS[kind]}")
        if not columns:
            continue
        has = np.concatenate([c[:, j] > 0 for c in counts])
        first = np.concatenate([p[:, columns[0]] for p in probabilities])
        read = [(p[:, columns] >= 0.5).sum(axis=1) for p in probabilities]  # (tiles,) per scene
        with_kind = [k for k, c in enumerate(counts) if c[:, j].any()]
        best = [bool(counts[k][int(np.argmax(probabilities[k][:, columns[0]])), j] > 0) for k in with_kind]
        tile_right = np.concatenate(read) == np.concatenate([np.minimum(c[:, j], len(columns)) for c in counts])
        scores[kind] = {
            "tiles_with": int(has.sum()),
            "tile_auc": auc_or_none(has, first),
            "tile_count_accuracy": float(np.mean(tile_right)),
            # the same over the tiles that hold the kind: most tiles are empty, and the figure above hides
            # a head that miscounts nearly every tile with objects (training history, item 32)
            "tile_count_accuracy_with": float(np.mean(tile_right[has])) if has.any() else None,
            "scene_count_accuracy": _scene_count_accuracy(read, counts, j),
            "best_tile_accuracy": float(np.mean(best)) if best else None,
        }
        from_centres = None if token_logits is None else [centre_counts(t, label_index, PLURALS[kind])
                                                          for t in token_logits]
        if from_centres and from_centres[0] is not None:
            scores[kind]["tile_count_accuracy_centres"] = float(np.mean(
                np.concatenate(from_centres) == np.concatenate([c[:, j] for c in counts])))
            scores[kind]["scene_count_accuracy_centres"] = _scene_count_accuracy(from_centres, counts, j)
        label = f"tile {PLURALS[kind]} >= 1"
        if cells is not None and label in cells[1]:
            scores[kind]["cell_auc"] = auc_or_none(cells[1][label], cells[0][:, label_index[label]])
    return scores


def rendered_scene_tiles(data: str | Path, scene: dict[str, Any], render: dict[str, Any], cache_dir: str | Path,
                         where: str) -> list[tuple[Path, int, int]]:
    """A held-out scene of ``data`` (a line of :data:`SCENES_FILE`) rendered with ``render`` as the recipes
    do: ``(tile image, row, column)`` for every tile, row-major (the thumbnail left out)."""
    from finetune import FinetuneError
    from finetune.data import TrainingRecord, record_visuals

    truth = scene["ground_truth"]
    record = TrainingRecord(scene["id"], (), raster=Path(data) / scene["image"], layout="grid",
                            render=dict(render), where=where)
    tiles = list(record_visuals(record, cache_dir).paths[1:])  # thumbnail first
    rows, cols = truth["grid"]["rows"], truth["grid"]["cols"]
    if len(tiles) != rows * cols:
        raise FinetuneError(f"{where}: rendered {len(tiles)} tiles, the scene has {rows}x{cols}; raise the "
                            "render's max_tiles")
    places = [(row, col) for row in range(1, rows + 1) for col in range(1, cols + 1)]  # row-major, as rendered
    return [(Path(tile), row, col) for tile, (row, col) in zip(tiles, places, strict=True)]


def probe_scenes(run: str | Path | ProbedHead, data: str | Path, render: dict[str, Any], cache_dir: str | Path,
                 limit: int | None = 20) -> dict[str, Any] | None:
    """Score the head on the tiles of ``data``'s first ``limit`` held-out scenes (:func:`object_scores`),
    rendered with ``render`` as the recipes do; None when ``data`` has no scenes."""
    from tqdm import tqdm

    from finetune.demo_data import tile_object_counts, tile_token_labels

    scenes_path = Path(data) / SCENES_FILE
    if not scenes_path.is_file():
        return None
    probed = run if isinstance(run, ProbedHead) else open_run(run)
    grid = probed.head.pooled_grid
    lines = scenes_path.read_text().splitlines()[:limit]
    counts, probabilities, token_logits, targets = [], [], [], []
    for number, line in enumerate(tqdm(lines, desc="probe scenes", unit="scene"), start=1):
        scene = json.loads(line)
        truth = scene["ground_truth"]
        rendered = rendered_scene_tiles(data, scene, render, cache_dir, f"{scenes_path}:{number}")
        tiles, places = [tile for tile, _, _ in rendered], [(row, col) for _, row, col in rendered]
        counts.append(np.array([tile_object_counts(truth["objects"], row, col) for row, col in places]))
        tokens = probed.token_logits(tiles)  # (tiles, t, L)
        probabilities.append(pooled_probabilities(tokens))
        token_logits.append(tokens)
        targets += [tile_token_labels(truth, row, col, probed.canvas, grid) for row, col in places]
    cells = _cells(token_logits, targets, grid, probed.label_index)
    return {"scenes": len(lines), "tiles": int(sum(len(c) for c in counts)),
            "objects": object_scores(counts, probabilities, probed.label_index, cells, token_logits)}


def needle_scores(colours: Sequence[str | None], shapes: Sequence[str | None], probabilities: np.ndarray,
                  label_index: dict[str, int], cells: tuple[np.ndarray, dict[str, np.ndarray]] | None = None
                  ) -> dict[str, Any]:
    """From each image's needle colour and shape (None: a haystack image) and ``(images, L)`` head
    probabilities: ``needle_auc`` (``niah needle`` against needle or not), ``colour_accuracy`` /
    ``shape_accuracy`` (on the needle images, the best ``niah colour *`` / ``niah shape *`` label is the
    true one) and, with ``cells``, ``cell_auc`` (each token's ``niah needle`` logit against the needle's
    cells)."""
    is_needle = np.array([c is not None for c in colours])
    scores: dict[str, Any] = {"needles": int(is_needle.sum()), "haystacks": int((~is_needle).sum())}
    if "niah needle" in label_index:
        scores["needle_auc"] = auc_or_none(is_needle, probabilities[:, label_index["niah needle"]])
    for field, truth in (("colour", colours), ("shape", shapes)):
        names = sorted(label for label in label_index if label.startswith(f"niah {field} "))
        if not names:
            continue
        best = np.array(names)[np.argmax(probabilities[:, [label_index[n] for n in names]], axis=1)]
        right = [b == f"niah {field} {t}" for b, t in zip(best, truth, strict=True) if t is not None]
        scores[f"{field}_accuracy"] = float(np.mean(right)) if right else None
    if cells is not None and "niah needle" in cells[1]:
        scores["cell_auc"] = auc_or_none(cells[1]["niah needle"], cells[0][:, label_index["niah needle"]])
    return scores


def probe_needles(run: str | Path | ProbedHead, n: int = PROBE_NEEDLES, seed: int = PROBE_NEEDLE_SEED,
                  size: int | None = None) -> dict[str, Any]:
    """Score the head on ``n`` needle images (colours and shapes cycled) and ``n`` haystack images drawn
    from ``seed`` (:func:`needle_scores`)."""
    from PIL import Image

    from domain_data.synthetic.niah import haystack_image, needle_image
    from finetune.demo_data import NIAH_SIZE, balanced_needles, needle_token_labels

    probed = run if isinstance(run, ProbedHead) else open_run(run)
    size = NIAH_SIZE if size is None else size
    grid, pairs = probed.head.pooled_grid, balanced_needles(n)
    arrays = [needle_image(seed, c, s, size, k) for k, (c, s) in enumerate(pairs)]
    arrays += [haystack_image(seed, n + k, size) for k in range(n)]
    truth = pairs + [(None, None)] * n
    targets = [needle_token_labels(a, [] if c is None else ["niah needle", f"niah colour {c}", f"niah shape {s}"],
                                   probed.canvas, grid) for a, (c, s) in zip(arrays, truth, strict=True)]
    tokens = np.concatenate([probed.token_logits([Image.fromarray(a) for a in arrays[k:k + 64]])
                             for k in range(0, len(arrays), 64)])  # (2n, t, L)
    cells = _cells([tokens], targets, grid, probed.label_index)
    return {"seed": seed, "size": size, **needle_scores([c for c, _ in truth], [s for _, s in truth],
                                                        pooled_probabilities(tokens), probed.label_index, cells)}


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines; floats with 3 decimals, None as ``-``."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(_cell, row)) + " |" for row in rows]


def format_table(result: dict[str, Any]) -> str:
    findings = result["findings"]
    lines = [f"vision probe of {result['run']} on {result['studies']} studies of {result['data']} "
             f"(render {result['render']})"]
    lines += _table(("finding", "studies with", "images with", "image AUC", "study AUC (max)", "study AUC (mean)",
                     "study AUC (bag)", "cell AUC", "side acc."),
                    [(name, s["studies_with"], s["images_with"], s["image_auc"], s["study_auc_max"],
                      s["study_auc_mean"], s.get("study_auc_bag"), s.get("cell_auc"), s.get("side_accuracy"))
                     for name, s in findings.items()])
    scenes = result.get("scenes")
    if scenes:
        lines += ["", f"{scenes['scenes']} scenes, {scenes['tiles']} tiles:"]
        lines += _table(("objects", "tiles with", "tile AUC", "cell AUC", "tile count acc.",
                         "tile count acc. (tiles with)", "scene count acc.", "best tile acc.",
                         "tile count acc. (centres)", "scene count acc. (centres)"),
                        [(kind, s["tiles_with"], s["tile_auc"], s.get("cell_auc"), s["tile_count_accuracy"],
                          s.get("tile_count_accuracy_with"), s["scene_count_accuracy"], s["best_tile_accuracy"],
                          s.get("tile_count_accuracy_centres"), s.get("scene_count_accuracy_centres"))
                         for kind, s in scenes["objects"].items()])
    needles = result.get("needles")
    if needles:
        lines += ["", f"{needles['needles']} needles and {needles['haystacks']} haystack images (seed {needles['seed']}):"]
        lines += _table(("needle AUC", "colour acc.", "shape acc.", "cell AUC"),
                        [[needles.get(key) for key in ("needle_auc", "colour_accuracy", "shape_accuracy", "cell_auc")]])
    return "\n".join(lines)


def add_render_arguments(parser: argparse.ArgumentParser, items: str) -> None:
    """The held-out probes' ``--render`` (YAML, default the demo recipes'), ``--cache-dir`` and ``--limit``
    (the first N ``items``, default 20, the card's); read ``--render`` back with ``yaml.safe_load``."""
    from finetune.demo_data import DEMO_CACHE_DIR, DEMO_RENDER

    default_render = json.dumps(DEMO_RENDER)  # JSON is YAML
    parser.add_argument("--render", default=default_render, metavar="YAML",
                        help=f"render options as the recipes give them (default: the demo recipes' {default_render})")
    parser.add_argument("--cache-dir", default=DEMO_CACHE_DIR, help=f"image cache for the renders (default {DEMO_CACHE_DIR})")
    parser.add_argument("--limit", type=int, default=20, help=f"first N {items} (default 20, the card's)")


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m finetune.vision_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a stage-'vision' run (model/ and the head)")
    parser.add_argument("--data", required=True, help="synthetic build folder with ct_test_studies.jsonl")
    add_render_arguments(parser, "studies and scenes")
    parser.add_argument("--needles", type=int, default=PROBE_NEEDLES,
                        help=f"fresh NIAH needle (and as many haystack) images to score (default {PROBE_NEEDLES}; 0: none)")
    parser.add_argument("--out", default=None, help="folder for vision_probe.json (default: --run)")
    args = parser.parse_args(argv)
    render = yaml.safe_load(args.render)
    probed = open_run(args.run)
    result = probe_ct(probed, args.data, render, args.cache_dir, args.limit)
    scenes = probe_scenes(probed, args.data, render, args.cache_dir, args.limit)
    if scenes is not None:
        result["scenes"] = scenes
    if args.needles:
        result["needles"] = probe_needles(probed, args.needles)
    write_probe_result(args.out or args.run, "vision_probe.json", result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
