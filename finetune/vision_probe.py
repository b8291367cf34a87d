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

Writes ``vision_probe.json`` and prints a table. This is the check to run after stage 1, before spending
an hour on stages 2-3 (model card, "How it got here").
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STUDIES_FILE = "ct_test_studies.jsonl"


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
    return scores


def _cell_targets(study: dict[str, Any], data: Path, render: dict[str, Any], count: int, grid: int,
                  labels: Sequence[str]) -> np.ndarray | None:
    """(images * grid**2, labels) bool: whether each label's finding covers each token cell of the study's
    slab images, or None when the study has no label map or the render is not slabs."""
    from domain_data.medical.slices import SLAB_WINDOW
    from domain_data.synthetic.ct_phantom import read_label_map
    from finetune.demo_data import slab_token_labels

    if render.get("window") != SLAB_WINDOW or "label_map" not in study:
        return None
    images = slab_token_labels(study["ground_truth"], read_label_map(data / study["label_map"]), render, count, grid)
    targets = np.zeros((count, grid * grid, len(labels)), dtype=bool)
    for k, image in enumerate(images):
        for j, label in enumerate(labels):
            targets[k, image.get(label, []), j] = True
    return targets.reshape(count * grid * grid, len(labels))


def probe_ct(run_dir: str | Path, data: str | Path, render: dict[str, Any], cache_dir: str | Path,
             limit: int | None = 20) -> dict[str, Any]:
    """Score the label head of the vision run ``run_dir`` (its ``model/`` and head) on ``data``'s studies."""
    import torch
    from tqdm import tqdm

    from finetune import FinetuneError
    from finetune.data import TrainingRecord, processor_image_loader, record_visuals
    from finetune.demo_data import rendered_slice_answers
    from finetune.vision import bag_logits, load_head, log_mean_exp
    from longllava.loading import load_model

    run_dir, studies_path = Path(run_dir), Path(data) / STUDIES_FILE
    if not studies_path.is_file():
        raise FinetuneError(f"{studies_path} not found: pass a synthetic build folder (python -m finetune.demo_data)")
    model, processor = load_model(run_dir / "model")
    head, vocabulary = load_head(model, run_dir)
    lines = studies_path.read_text().splitlines()[:limit]
    load = processor_image_loader(processor.image_processor)
    answers, truths, probabilities, bags, token_logits, cell_targets = [], [], [], [], [], []
    for number, line in enumerate(tqdm(lines, desc="probe studies", unit="study"), start=1):
        study = json.loads(line)
        record = TrainingRecord(study["id"], (), ct=Path(data) / study["image"], layout="series",
                                render=dict(render), where=f"{studies_path}:{number}")
        visuals = record_visuals(record, cache_dir)
        with torch.no_grad():
            tokens = head.token_logits(load(list(visuals.paths)))  # (images, t, L)
        logits = log_mean_exp(tokens, dim=1)  # (images, L): the head's pooling
        probabilities.append(torch.sigmoid(logits).numpy())
        bags.append(torch.sigmoid(bag_logits(logits)).numpy())
        answers.append(rendered_slice_answers(study["ground_truth"], render, len(visuals.paths)))
        truths.append(study["ground_truth"]["findings"])
        targets = _cell_targets(study, Path(data), render, len(visuals.paths), head.pooled_grid, vocabulary)
        if targets is not None:
            token_logits.append(tokens.flatten(0, 1).numpy())
            cell_targets.append(targets)
    label_index = {label: i for i, label in enumerate(vocabulary)}
    cells = None
    if cell_targets and len(cell_targets) == len(lines):
        stacked = np.concatenate(cell_targets)
        cells = (np.concatenate(token_logits), {label: stacked[:, i] for label, i in label_index.items()})
    return {"run": str(run_dir), "data": str(data), "render": render, "studies": len(lines),
            "findings": finding_scores(answers, truths, probabilities, label_index, bags, cells)}


def format_table(result: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [f"vision probe of {result['run']} on {result['studies']} studies of {result['data']} "
            f"(render {result['render']})",
            "| finding | studies with | images with | image AUC | study AUC (max) | study AUC (mean) "
            "| study AUC (bag) | cell AUC |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in result["findings"].items():
        rows.append(f"| {name} | {s['studies_with']} | {s['images_with']} | {cell(s['image_auc'])} | "
                    f"{cell(s['study_auc_max'])} | {cell(s['study_auc_mean'])} | {cell(s.get('study_auc_bag'))} | "
                    f"{cell(s.get('cell_auc'))} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    from finetune.demo_data import DEMO_CACHE_DIR, DEMO_RENDER

    default_render = json.dumps(DEMO_RENDER)  # JSON is YAML
    parser = argparse.ArgumentParser(prog="python -m finetune.vision_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a stage-'vision' run (model/ and the head)")
    parser.add_argument("--data", required=True, help="synthetic build folder with ct_test_studies.jsonl")
    parser.add_argument("--render", default=default_render, metavar="YAML",
                        help=f"CT render options as the recipes give them (default: the demo recipes' {default_render})")
    parser.add_argument("--cache-dir", default=DEMO_CACHE_DIR, help=f"image cache for the renders (default {DEMO_CACHE_DIR})")
    parser.add_argument("--limit", type=int, default=20, help="first N studies (default 20, the card's)")
    parser.add_argument("--out", default=None, help="folder for vision_probe.json (default: --run)")
    args = parser.parse_args(argv)
    render = yaml.safe_load(args.render)
    result = probe_ct(args.run, args.data, render, args.cache_dir, args.limit)
    write_probe_result(args.out or args.run, "vision_probe.json", result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
