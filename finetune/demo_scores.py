"""Score the demo model on its held-out synthetic sets, beside majority-answer baselines.

``python -m finetune.demo_scores --model demo --data build/synthetic --out build/demo_eval`` runs
``longllava evaluate`` (the same :func:`finetune.evaluate.evaluate`) on:

* ``ct``: ``ct_test.jsonl`` (task ``ct-rate``): presence macro positive-class F1, yes/no accuracy,
  exact match of side / count / slice-range questions, report findings parsed;
* ``rs``: ``rs_test_fitrsfg.jsonl`` (task ``fit-rsfg``): official accuracy per category (count, presence,
  row, column, tile);
* ``niah100`` / ``niah1000``: generated needle-in-a-haystack items (:data:`NIAH_SPECS`), 100 and 1000 images.

Every figure gets a baseline: the same metric applied to the *majority answer* of its question group
(CT: kind + finding; satellite: category + object; NIAH: all items) taken over the scored set itself
(the best any constant answer can do there). Results go to ``OUT/scores.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.vision import VISION_HEAD_FILE, VISION_LABELS_FILE

NIAH_SPECS = {
    "niah100": "synthetic:n_images=100;depths=0,0.25,0.5,0.75,1;seed=1;size=112;repeats=4",
    "niah1000": "synthetic:n_images=1000;depths=0,0.5,1;seed=1;size=112;repeats=1",
}
RS_OBJECTS = ("storage tank", "ship", "building")


def group_of(task: str, reference: dict) -> tuple:
    """The question group whose majority answer is the baseline's prediction."""
    if task == "ct-rate":
        return reference.get("kind"), reference.get("finding")
    if task == "fit-rsfg":
        question = reference.get("question", "").lower()
        return reference.get("category"), next((o for o in RS_OBJECTS if o in question), None)
    return (task,)


def reference_answer(task: str, reference: dict) -> str:
    return str(reference.get("ground_truth", reference.get("answer", "")))


def majority_rows(task: str, rows: Sequence[dict]) -> list[dict]:
    """``rows`` with every prediction replaced by its group's most common reference answer (ties: first seen)."""
    answers: dict[tuple, Counter] = defaultdict(Counter)
    for row in rows:
        answers[group_of(task, row["reference"])][reference_answer(task, row["reference"])] += 1
    majority = {group: counts.most_common(1)[0][0] for group, counts in answers.items()}
    return [{**row, "prediction": majority[group_of(task, row["reference"])]} for row in rows]


def headline_figures(task: str, metrics: dict) -> dict[str, float]:
    """The figures the model card reports for a task."""
    if task == "ct-rate":
        figures = {"presence_macro_f1": metrics["presence"]["macro_f1"],
                   "yes_no_accuracy": metrics["presence"]["yes_no_accuracy"]}
        figures.update({f"{kind}_exact_match": value for kind, value in metrics.get("exact_match", {}).items()})
        figures.update({f"f1_{name}": value["f1"] for name, value in metrics["presence"]["per_finding"].items()})
        if "reports" in metrics:
            figures["report_macro_f1_over_present"] = metrics["reports"]["macro_over_present"]["f1"]
        return figures
    if task == "fit-rsfg":
        official = metrics["vqa"]["official"]
        return {"overall_accuracy": official["overall"]["accuracy"],
                **{f"{k}_accuracy": v["accuracy"] for k, v in official["per_category"].items()}}
    return {"accuracy": metrics["accuracy"]}


def score_with_baseline(task: str, out_dir: Path) -> dict[str, Any]:
    """Model figures and majority baselines from an evaluation folder's predictions."""
    from finetune.evaluate import METRICS, read_predictions

    rows = list(read_predictions(out_dir / "predictions.jsonl").values())
    model = headline_figures(task, METRICS[task](rows))
    baseline = headline_figures(task, METRICS[task](majority_rows(task, rows)))
    return {"task": task, "n": len(rows), "model": model, "majority_baseline": baseline}


def evaluation_plan(data_dir: Path) -> dict[str, tuple[str, str]]:
    """name -> (task, --data) of the held-out sets in a ``finetune.demo_data`` folder."""
    return {
        "ct": ("ct-rate", str(data_dir / "ct_test.jsonl")),
        "rs": ("fit-rsfg", str(data_dir / "rs_test_fitrsfg.jsonl")),
        **{name: ("niah", spec) for name, spec in NIAH_SPECS.items()},
    }


def run_scores(model: str, data_dir: str | Path, out_dir: str | Path, only: Sequence[str] = (),
               batch_size: int = 4) -> dict[str, Any]:
    """Evaluate (resumable) every set of :func:`evaluation_plan` and write ``OUT/scores.json``."""
    import time

    from finetune.evaluate import evaluate

    out = Path(out_dir)
    results: dict[str, Any] = {}
    for name, (task, data) in evaluation_plan(Path(data_dir)).items():
        if only and name not in only:
            continue
        started = time.monotonic()
        evaluate(task, model, data, out / name, batch_size=1 if name == "niah1000" else batch_size)
        results[name] = {**score_with_baseline(task, out / name), "data": data,
                         "seconds_this_run": round(time.monotonic() - started, 1)}
    (out / "scores.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


CI_SUBSET = {"n_ct": 1, "n_rs": 1, "niah_spec": "synthetic:n_images=100;depths=0;seed=1;size=112;repeats=2"}
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "processor_config.json", "chat_template.jinja", "longllava_defaults.json")
RUN_FILES = {"recipe.yaml": "training_recipe.yaml", "loss.csv": "loss.csv", "loss.png": "loss.png",
             "training_summary.json": "training_summary.json"}


def ci_subset_predictions(eval_dir: Path) -> dict[str, dict[str, str]]:
    """The full run's answers for the items :data:`CI_SUBSET` re-scores (first study / scene, depth-0 NIAH)."""
    prefixes = {"ct": "ct_test_0000_", "rs": "rs_test_0000_", "niah100": "niah_n100_d0.000_r"}
    picked: dict[str, dict[str, str]] = {}
    for name, prefix in prefixes.items():
        rows = read_predictions_file(eval_dir / name / "predictions.jsonl")
        chosen = {i: r["prediction"] for i, r in rows.items() if i.startswith(prefix)}
        if name == "niah100":
            chosen = {i: p for i, p in chosen.items() if int(i.rsplit("_r", 1)[1]) < 2}
        picked["niah" if name == "niah100" else name] = chosen
    return picked


def read_predictions_file(path: Path) -> dict[str, dict]:
    from finetune.evaluate import read_predictions

    return read_predictions(path)


def earlier_stages(run_dir: str | Path) -> list[Path]:
    """The runs a run was started from, oldest first: each ``recipe.yaml`` whose ``base_model`` is
    ``OTHER_RUN/model`` (with its own ``recipe.yaml``) leads to ``OTHER_RUN``; a preset ends the chain."""
    import yaml

    chain: list[Path] = []
    run = Path(run_dir)
    while True:
        base = Path(str(yaml.safe_load((run / "recipe.yaml").read_text()).get("base_model", "")))
        if base.name != "model" or not (base.parent / "recipe.yaml").is_file() or base.parent in chain:
            return chain[::-1]
        run = base.parent
        chain.append(run)


def export_checkpoint(run_dir: str | Path, eval_dir: str | Path, dest: str | Path) -> Path:
    """Copy a finished demo run's model (+ recipe, loss curve, summary; ``stageN_recipe.yaml`` /
    ``stageN_loss.csv`` of the runs it was started from, and a vision stage's head) to ``dest`` with ``eval_scores.json`` (full
    held-out figures with baselines, and the CI subset's expected answers)."""
    import shutil

    run, evals, out = Path(run_dir), Path(eval_dir), Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (run / "model" / name).is_file():
            shutil.copyfile(run / "model" / name, out / name)
    for source, target in RUN_FILES.items():
        shutil.copyfile(run / source, out / target)
    for number, stage in enumerate(earlier_stages(run), start=1):
        for source in ("recipe.yaml", "loss.csv", VISION_HEAD_FILE, VISION_LABELS_FILE):
            if source.startswith("vision_") and not (stage / source).is_file():
                continue  # only a stage-'vision' run has a head
            shutil.copyfile(stage / source, out / f"stage{number}_{source}")
    full = json.loads((evals / "scores.json").read_text())
    counts = json.loads((Path(full["ct"]["data"]).parent / "manifest.json").read_text())["counts"]
    scores = {"full": full, "heldout": {"n_ct": counts["ct_test_studies"], "n_rs": counts["rs_test_scenes"]},
              "ci_subset": {**CI_SUBSET, "predictions": ci_subset_predictions(evals)}}
    (out / "eval_scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    if (out / "MODEL_CARD.md").is_file():
        fill_card(out / "MODEL_CARD.md", scores["full"])
    return out


CARD_BEGIN, CARD_END = "<!-- scores:begin -->", "<!-- scores:end -->"
CARD_ROWS = {  # set -> figures shown in the card (all figures are in eval_scores.json)
    "ct": ("presence_macro_f1", "yes_no_accuracy", "f1_Cardiomegaly", "f1_Consolidation", "f1_Emphysema",
           "f1_Lung nodule", "f1_Pleural effusion", "side_exact_match", "count_exact_match",
           "slices_exact_match", "report_macro_f1_over_present"),
    "rs": ("overall_accuracy", "count_accuracy", "presence_accuracy", "row_accuracy", "column_accuracy",
           "tile_accuracy"),
    "niah100": ("accuracy",),
    "niah1000": ("accuracy",),
}
SET_TITLES = {"ct": "CT presence / side / count / slices (ct_test.jsonl, task ct-rate)",
              "rs": "Satellite (rs_test_fitrsfg.jsonl, task fit-rsfg, official exact match)",
              "niah100": "Needle in a haystack, 100 images", "niah1000": "Needle in a haystack, 1000 images"}


def card_tables(full: dict[str, Any]) -> str:
    """Markdown tables of the held-out figures beside their majority-answer baselines."""
    lines = ["| set | figure | demo model | majority answer | items |", "|---|---|---|---|---|"]
    for name, keys in CARD_ROWS.items():
        if name not in full:
            continue
        result = full[name]
        for key in keys:
            if key in result["model"]:
                lines.append(f"| {SET_TITLES[name]} | {key} | {result['model'][key]:.3f} | "
                             f"{result['majority_baseline'][key]:.3f} | {result['n']} |")
    return "\n".join(lines)


def fill_card(card_path: Path, full: dict[str, Any]) -> None:
    """Replace the text between the card's score markers with :func:`card_tables`."""
    text = card_path.read_text()
    head, _, rest = text.partition(CARD_BEGIN)
    _, _, tail = rest.partition(CARD_END)
    card_path.write_text(f"{head}{CARD_BEGIN}\n{card_tables(full)}\n{CARD_END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo_scores", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", default="build/synthetic", help="folder written by python -m finetune.demo_data")
    parser.add_argument("--out", default="build/demo_eval")
    parser.add_argument("--only", nargs="*", default=(), help="subset of: ct rs niah100 niah1000")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--export", nargs=2, metavar=("RUN_DIR", "DEST"), default=None,
                        help="after scoring, copy RUN_DIR/model + eval_scores.json to DEST (the bundled folder)")
    args = parser.parse_args(argv)
    results = run_scores(args.model, args.data, args.out, args.only, args.batch_size)
    print(json.dumps({name: {"model": r["model"], "majority_baseline": r["majority_baseline"]}
                      for name, r in results.items()}, indent=1))
    if args.export:
        print(f"exported to {export_checkpoint(args.export[0], args.out, args.export[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
