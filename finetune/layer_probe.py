"""Where does a CT finding's evidence get lost between the images and the answer?

``python -m finetune.layer_probe --model M --train build/synthetic --data build/heldout20`` asks every
study one presence question and keeps, for every layer of the language model, two hidden states: the mean
over the study's image tokens and the answer position (the last prompt token). Per layer, per finding and
per part it fits a logistic regression on the first ``--n-train`` training studies
(``ct_train_studies.jsonl``) and reports its ROC AUC on the first ``--limit`` held-out studies
(``ct_test_studies.jsonl``). Evidence present in the image tokens but not at the answer position is lost on
the way (the demo model's training history, item 9: Mamba layers without memory); evidence at the answer position that
the model's own Yes/No does not use (``python -m finetune.readout_probe``) is lost in the readout (item 10).
Writes ``layer_probe.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.vision_probe import STUDIES_FILE, auc_or_none, write_probe_result

RESULT_FILE = "layer_probe.json"
PARTS = ("image mean", "answer position")
DEFAULT_QUESTION = "Does this chest CT show emphysema? Answer Yes or No."
PROBE_C = 0.05  # strong L2 regularisation: a few hundred studies, hidden sizes of hundreds


def study_truth(studies_file: Path, limit: int) -> tuple[list[dict[str, Any]], list[str], np.ndarray]:
    """The first ``limit`` studies of a ``ct_*_studies.jsonl``, the finding names, and (studies x findings)
    presence."""
    from finetune import FinetuneError

    if not studies_file.is_file():
        raise FinetuneError(f"{studies_file}: missing; pass a synthetic build folder (python -m finetune.demo_data)")
    studies = [json.loads(line) for line in studies_file.open() if line.strip()][:limit]
    if not studies:
        raise FinetuneError(f"{studies_file}: no studies")
    findings = sorted(studies[0]["ground_truth"]["findings"])
    truth = np.array([[s["ground_truth"]["findings"][f]["present"] for f in findings] for s in studies], dtype=bool)
    return studies, findings, truth


def question_records(studies: Sequence[dict[str, Any]], question: str, root: Path) -> list[dict[str, Any]]:
    """One evaluation record per study asking ``question`` (the answer is not used); study paths made
    absolute against the build folder ``root``, so the records can live anywhere."""
    return [{"id": s["id"], "image": str((root / s["image"]).resolve()), "layout": "series", "kind": "probe",
             "study": s["id"],
             "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "No"}]}
            for s in studies]


def layer_states(model: Any, processor: Any, records_file: Path, render: dict, cache: Path) -> np.ndarray:
    """(studies x layers + 1 x parts x hidden): per hidden state, the image-token mean and the answer position."""
    import torch
    from tqdm import tqdm

    from finetune.evaluate import item_prompt, load_ct_rate_items

    image_token = model.config.image_token_id
    states = []
    for item in tqdm(load_ct_rate_items(str(records_file), None, render), desc=records_file.stem, unit="study"):
        prompt, images = item_prompt(item, cache)
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**inputs, output_hidden_states=True).hidden_states
        is_image = inputs["input_ids"][0] == image_token
        states.append(torch.stack([torch.stack([h[0][is_image].mean(0), h[0, -1]]) for h in hidden]).float().numpy())
    return np.stack(states)


def probe_aucs(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> list[float | None]:
    """Per column of ``train_y`` (findings): the held-out AUC of a logistic regression on standardised
    features (``train_x``: studies x features); ``None`` where a split has one class only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    aucs: list[float | None] = []
    scaler = StandardScaler().fit(train_x)
    train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
    for column in range(train_y.shape[1]):
        if len(set(train_y[:, column].tolist())) < 2:
            aucs.append(None)
            continue
        classifier = LogisticRegression(C=PROBE_C, max_iter=2000).fit(train_z, train_y[:, column])
        aucs.append(auc_or_none(test_y[:, column].tolist(), classifier.decision_function(test_z).tolist()))
    return aucs


def layer_probe(model_path: str, train_data: str | Path, data: str | Path, n_train: int = 200, limit: int = 20,
                question: str = DEFAULT_QUESTION, work_dir: str | Path | None = None,
                cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Per layer and part, the held-out AUC of each finding (see the module docstring). ``work_dir`` gets
    the question files; ``cache_dir`` (default: inside ``work_dir``) the rendered studies."""
    from finetune import FinetuneError
    from finetune.evaluate import model_render_defaults
    from finetune.merge import load_trained
    from finetune.train import install_fast_scan_if_available

    work = Path(work_dir) if work_dir is not None else Path(data) / "layer_probe_work"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else work / "image_cache"
    train_studies, findings, train_y = study_truth(Path(train_data) / "ct_train_studies.jsonl", n_train)
    test_studies, test_findings, test_y = study_truth(Path(data) / STUDIES_FILE, limit)
    if test_findings != findings:  # the probes pair truth columns by position
        raise FinetuneError(f"{data} names the findings {test_findings}, {train_data} {findings}; "
                            "pass two builds of the same generator")
    install_fast_scan_if_available()
    model, processor = load_trained(model_path)
    render = model_render_defaults(model_path)
    features = {}
    for split, studies, root in (("train", train_studies, train_data), ("test", test_studies, data)):
        records = work / f"{split}_questions.jsonl"
        rows = question_records(studies, question, Path(root))
        records.write_text("".join(json.dumps(r) + "\n" for r in rows))
        features[split] = layer_states(model, processor, records, render, cache)
    layers = []
    for layer in range(features["train"].shape[1]):
        layers.append({part: dict(zip(findings, probe_aucs(features["train"][:, layer, p], train_y,
                                                           features["test"][:, layer, p], test_y)))
                       for p, part in enumerate(PARTS)})
    return {"model": str(model_path), "train_data": str(train_data), "data": str(data), "question": question,
            "n_train": len(train_studies), "n_test": len(test_studies), "findings": findings,
            "test_present": dict(zip(findings, test_y.sum(axis=0).tolist())), "layers": layers}


def format_table(result: dict[str, Any]) -> str:
    findings = result["findings"]
    width = max(len(f) for f in findings)
    lines = ["layer | part            | " + " | ".join(f"{f:>{width}}" for f in findings)]
    for index, layer in enumerate(result["layers"]):
        for part in PARTS:
            cells = [f"{'n/a':>{width}}" if layer[part][f] is None else f"{layer[part][f]:>{width}.2f}"
                     for f in findings]
            lines.append(f"{index:>5} | {part:<15} | " + " | ".join(cells))
    lines.append("(layer 0 = embeddings; held-out ROC AUC of a logistic probe trained on "
                 f"{result['n_train']} studies, scored on {result['n_test']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.layer_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or 'demo')")
    parser.add_argument("--train", default="build/synthetic", help="build with ct_train_studies.jsonl")
    parser.add_argument("--data", required=True, help="build with ct_test_studies.jsonl (held-out)")
    parser.add_argument("--n-train", type=int, default=200, help="training studies to fit on (default 200)")
    parser.add_argument("--limit", type=int, default=20, help="held-out studies to score (default 20)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="the presence question every study is asked")
    parser.add_argument("--cache-dir", help="image cache for the rendered studies (e.g. the training run's "
                        "build/demo_image_cache; default: a folder beside layer_probe.json)")
    parser.add_argument("--out", help="folder for layer_probe.json (default: the model folder's parent)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    result = layer_probe(args.model, args.train, args.data, args.n_train, args.limit, args.question,
                         work_dir=out / "layer_probe_work", cache_dir=args.cache_dir)
    write_probe_result(out, RESULT_FILE, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
