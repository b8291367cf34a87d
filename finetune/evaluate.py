"""Score a model on a dataset: predictions JSONL (resumable), metrics JSON, markdown report, charts.

Tasks (``longllava evaluate TASK --model DIR --data PATH --out DIR``):

* ``ct-rate``: a CT-RATE root (``dataset/`` with reports and labels: one report per volume, parsed
  into the 18 abnormalities with :func:`domain_data.medical.metrics.parse_findings`, scored with
  :func:`~domain_data.medical.metrics.ct_rate_scores`), or LLaVA-style question records with
  ``kind`` / ``finding`` (the synthetic ``ct_test.jsonl``): presence questions give per-finding
  positive-class P/R/F1 and yes/no accuracy, reports are parsed as above, other kinds exact match.
* ``fit-rsfg``: FIT-RSFG-Bench JSONL; official and lenient VQA accuracy per category
  (:mod:`domain_data.remote_sensing.metrics`); a ``.tif`` image or ``layout: grid`` is tiled. Counting
  questions also get a true-count x answered-count table (``count_confusion`` in ``metrics.json``,
  ``count_confusion.png`` and a table in ``report.md``): which counts the model misses, and as what.
* ``closed-vqa``: VQA-RAD / PathVQA / SLAKE style closed questions (HuatuoGPT-Vision matching).
* ``niah``: needle in a haystack. ``--data`` is a JSONL of NIAH records (``images``, ``answer``,
  ``depth``; the synthetic ``niah_test.jsonl``) or a generator spec: a JSON file or the inline form
  ``synthetic:n_images=10,50;depths=0,0.5,1;seed=0;size=56;repeats=1`` (images drawn with
  :func:`domain_data.synthetic.niah.make_niah`). Accuracy per (number of images, depth) + heatmap.

Resumable: every finished batch is appended to ``predictions.jsonl`` and flushed; a rerun with the
same ``--out`` skips the ids already there (a half-written last line is dropped), so a killed run
continues where it stopped. ``run.json`` records task, model and data; a different run in the same
folder is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import FinetuneError
from finetune.data import (
    TrainingRecord,
    load_records,
    parse_record,
    read_json_records,
    record_visuals,
    to_messages,
)

REPORT_QUESTION = "Write the findings and impressions of this chest CT."
# Generation caps per task: above the longest reference answer in the demo tokenizer's tokens (its 1,024
# byte-level BPE spends up to 225 tokens on a synthetic report and 9 on "yellow triangle"; caps of 160 and
# 8 cut such answers and scored them wrong; tests/finetune/test_evaluate.py checks it), and for CT-RATE
# room for a real report of a few hundred words. Generation stops at the end-of-turn token, so a roomy
# cap costs nothing on short answers.
DEFAULT_MAX_NEW_TOKENS = {"ct-rate": 512, "fit-rsfg": 24, "closed-vqa": 8, "niah": 16}


@dataclass
class EvalItem:
    """One prompt: the record gives the visual input and the question; ``reference`` the truth."""

    id: str
    record: TrainingRecord
    reference: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    task: str
    out_dir: Path
    metrics: dict
    generated: int  # predictions made by this call (the rest were resumed)

    def summary_line(self) -> str:
        headline = self.metrics.get("headline", {})
        figures = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in headline.items())
        return f"{self.task}: {figures} ({self.metrics.get('n', 0)} items) -> {self.out_dir}/metrics.json"


def _question_record(item_id: str, question: str, where: str, **visual: Any) -> TrainingRecord:
    return TrainingRecord(id=item_id, conversations=({"from": "human", "value": question},), where=where, **visual)


# ----------------------------------------------------------------------------------------------
# Loading each task's items


def load_niah_items(data: str, out_dir: Path) -> list[EvalItem]:
    """NIAH records from a JSONL, or generated from a spec (JSON file or ``synthetic:...``)."""
    spec = _niah_spec(data)
    if spec is None:
        items = []
        for where, raw in read_json_records(data):
            record = parse_record({**raw, "conversations": [{"from": "human", "value": raw.get("question", "")}]},
                                  where, Path(data).parent)
            if "answer" not in raw or not raw.get("question"):
                raise FinetuneError(f"{where}: a NIAH record needs 'question' and 'answer'")
            depth = raw.get("depth", raw.get("needle_index", 0) / max(len(record.images) - 1, 1))
            items.append(EvalItem(record.id, record, {"answer": raw["answer"], "n_images": len(record.images),
                                                       "depth": round(float(depth), 4)}))
        return items
    return _generate_niah(spec, out_dir / "niah_images")


def _niah_spec(data: str) -> dict | None:
    if data.startswith("synthetic:"):
        spec: dict[str, Any] = {}
        for part in filter(None, data.removeprefix("synthetic:").split(";")):
            key, _, value = part.partition("=")
            values = [float(v) if "." in v else int(v) for v in value.split(",") if v]
            spec[key.strip()] = values if key.strip() in ("n_images", "depths") else values[0]
        return spec
    path = Path(data)
    if path.suffix == ".json" and path.is_file():
        payload = json.loads(path.read_text())
        if isinstance(payload, dict):
            return payload
    return None


def _generate_niah(spec: dict, folder: Path) -> list[EvalItem]:
    from PIL import Image

    from domain_data.synthetic.niah import NIAH_QUESTION, make_niah

    unknown = set(spec) - {"n_images", "depths", "seed", "size", "repeats"}
    if unknown or "n_images" not in spec:
        raise FinetuneError(f"NIAH spec {spec}: needs n_images (list) and optional depths, seed, size, repeats; "
                            f"unknown keys {sorted(unknown)}")
    items = []
    seed, size, repeats = int(spec.get("seed", 0)), int(spec.get("size", 112)), int(spec.get("repeats", 1))
    for n_images in spec["n_images"]:
        for depth_index, depth in enumerate(spec.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0])):
            for repeat in range(repeats):
                # a different needle per cell and repeat, reproducible from the spec's seed
                sample_seed = ((seed * 1009 + int(n_images)) * 101 + depth_index) * 97 + repeat
                item_id = f"niah_n{n_images}_d{float(depth):.3f}_r{repeat}"
                item_dir = folder / item_id
                paths = [item_dir / f"{i:04d}.png" for i in range(n_images)]
                if not all(p.is_file() for p in paths):
                    sample = make_niah(sample_seed, int(n_images), float(depth), size)
                    item_dir.mkdir(parents=True, exist_ok=True)
                    for path, pixels in zip(paths, sample.images):
                        Image.fromarray(pixels).save(path)
                    answer = sample.answer
                    (item_dir / "answer.txt").write_text(answer)
                else:
                    answer = (item_dir / "answer.txt").read_text()
                record = _question_record(item_id, NIAH_QUESTION, str(item_dir), images=tuple(paths))
                items.append(EvalItem(item_id, record, {"answer": answer, "n_images": int(n_images),
                                                        "depth": round(float(depth), 4)}))
    return items


def load_ct_rate_items(data: str, split: str | None, render: dict) -> list[EvalItem]:
    path = Path(data)
    if path.is_dir() and ((path / "dataset").is_dir() or (path / "radiology_text_reports").is_dir()):
        from domain_data.medical.ct_rate import CTRateDataset

        dataset = CTRateDataset(path, split=split or "valid", require_labels=True)
        items = []
        for record in dataset:
            options = {**render, "ct_rate_metadata": record.metadata_row or None}
            visual = _question_record(record.volume_name, REPORT_QUESTION, str(record.volume_path),
                                      ct=record.volume_path, layout="series", render=options)
            items.append(EvalItem(record.volume_name, visual, {"kind": "report", "labels": record.labels}))
        return items
    if path.is_dir() and (path / "ct_test.jsonl").is_file():
        path = path / "ct_test.jsonl"
    return _question_items(path, render, keys=("kind", "finding", "study"))


def _question_items(path: Path, render: dict, keys: Sequence[str]) -> list[EvalItem]:
    """Each LLaVA record = one question (first human turn) with the first gpt turn as reference."""
    items = []
    for record in load_records(path):
        human = next((t for t in record.conversations if t["from"] in ("human", "user")), None)
        answer = next((t["value"] for t in record.conversations if t["from"] in ("gpt", "assistant")), None)
        if human is None or answer is None:
            raise FinetuneError(f"{record.where}: an evaluation record needs a human question and a gpt answer")
        raw = dict(read_json_records(path))[record.where]
        question_record = TrainingRecord(record.id, (human,), record.images, record.layout, record.grid,
                                         record.ct, record.raster, {**record.render, **render}, record.where)
        reference = {"answer": answer, **{k: raw.get(k) for k in keys if k in raw}}
        items.append(EvalItem(record.id, question_record, reference))
    return items


def load_fitrsfg_items(data: str, render: dict) -> list[EvalItem]:
    from domain_data.remote_sensing.datasets import load_fitrsfg_bench

    bench = load_fitrsfg_bench(data)
    layouts = {str(raw.get("question_id")): raw.get("layout") for _, raw in read_json_records(data)}
    items = []
    for item in bench:
        tiled = layouts.get(item.question_id) == "grid" or item.image.suffix.lower() in (".tif", ".tiff")
        visual = (dict(raster=item.image, layout="grid", render=dict(render)) if tiled
                  else dict(images=(item.image,)))
        record = _question_record(item.question_id, item.question, f"{data}:{item.question_id}", **visual)
        items.append(EvalItem(item.question_id, record, {"ground_truth": item.ground_truth,
                                                         "category": item.category, "question": item.question}))
    return items


def load_closed_vqa_items(data: str) -> list[EvalItem]:
    from domain_data.medical.closed_vqa import ClosedVQADataset

    dataset = ClosedVQADataset(data)
    items = []
    for row in dataset:
        record = _question_record(row.question_id, row.prompt(), f"{data}:{row.question_id}",
                                  images=tuple(row.image_paths))
        items.append(EvalItem(row.question_id, record, {"options": list(row.options), "answer": row.answer,
                                                        "dataset": row.dataset}))
    return items


def load_items(task: str, data: str, out_dir: Path, split: str | None = None, render: dict | None = None
               ) -> list[EvalItem]:
    """The task's evaluation items (ids unique)."""
    render = render or {}
    if task == "niah":
        items = load_niah_items(data, out_dir)
    elif not Path(data).exists():
        raise FinetuneError(f"evaluation data {data} not found; pass an existing file or folder with --data")
    elif task == "ct-rate":
        items = load_ct_rate_items(data, split, render)
    elif task == "fit-rsfg":
        items = load_fitrsfg_items(data, render)
    elif task == "closed-vqa":
        items = load_closed_vqa_items(data)
    else:
        raise FinetuneError(f"unknown task {task!r}; use ct-rate, fit-rsfg, closed-vqa or niah")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise FinetuneError(f"{data}: item id {item.id!r} appears twice; ids must be unique to resume safely")
        seen.add(item.id)
    if not items:
        raise FinetuneError(f"{data}: no items to evaluate")
    return items


# ----------------------------------------------------------------------------------------------
# Predictions (resumable JSONL)


def read_predictions(path: Path) -> dict[str, dict]:
    """Finished predictions by id; a truncated last line (a killed write) is dropped from the file."""
    if not path.is_file():
        return {}
    done: dict[str, dict] = {}
    good_bytes = 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            done[str(row["id"])] = row
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return done


def append_predictions(path: Path, rows: Sequence[dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _check_run(out_dir: Path, task: str, model: str, data: str) -> None:
    run_path = out_dir / "run.json"
    run = {"task": task, "model": str(model), "data": str(data)}
    if run_path.is_file():
        previous = json.loads(run_path.read_text())
        if previous != run:
            raise FinetuneError(
                f"{out_dir} holds predictions of another run ({previous}); choose another --out or delete it"
            )
    else:
        run_path.write_text(json.dumps(run, indent=2))


# ----------------------------------------------------------------------------------------------
# Generation


class Generator:
    """Greedy answers for batches of (chat prompt, images) with a model and its processor.

    Prompts up to ``long_context_tokens`` (after image expansion) go through ``model.generate`` in a
    left-padded batch; longer ones one at a time through :class:`longllava.session.LongContextSession`
    (images encoded in batches, chunked prefill), so a 1,000-image haystack never materialises all
    pixel tensors or one 144k-token forward pass.
    """

    def __init__(self, model: Any, processor: Any, max_new_tokens: int, long_context_tokens: int = 8192) -> None:
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.long_context_tokens = long_context_tokens
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self._session = None

    def prompt_tokens(self, prompt: str, n_images: int) -> int:
        """Length of ``prompt`` once every ``<image>`` is expanded."""
        per_image = int(getattr(self.processor, "tokens_per_image", 1))
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + n_images * (per_image - 1)

    def __call__(self, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> list[str]:
        answers: list[str | None] = [None] * len(prompts)
        short = []
        for index, (prompt, group) in enumerate(zip(prompts, images)):
            if self.prompt_tokens(prompt, len(group)) > self.long_context_tokens:
                answers[index] = self._long(prompt, group)
            else:
                short.append(index)
        if short:
            for index, answer in zip(short, self._batch([prompts[i] for i in short], [images[i] for i in short])):
                answers[index] = answer
        return [a or "" for a in answers]

    def _batch(self, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> list[str]:
        import torch

        flat = [image for group in images for image in group]
        inputs = self.processor(text=list(prompts), images=flat or None, padding=True, return_tensors="pt")
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=pad_id, eos_token_id=self.tokenizer.eos_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _long(self, prompt: str, images: Sequence[Any]) -> str:
        if self._session is None:
            from longllava.session import LongContextSession

            self._session = LongContextSession(self.model, self.processor)
        return str(self._session.generate(prompt, list(images), max_new_tokens=self.max_new_tokens)).strip()


def item_prompt(item: EvalItem, cache_dir: Path) -> tuple[str, list]:
    """The chat prompt text (generation prompt appended) and the PIL images of one item."""
    from PIL import Image

    from longllava.protocol import render_prompt

    visuals = record_visuals(item.record, cache_dir)
    messages = to_messages(item.record, visuals, require_answer=False)
    images = []
    for path in visuals.paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return render_prompt(messages, add_generation_prompt=True), images


# ----------------------------------------------------------------------------------------------
# Metrics per task


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def niah_metrics(rows: Sequence[dict]) -> dict:
    cells: dict[tuple[int, float], list[int]] = defaultdict(list)
    for row in rows:
        correct = _normalize(row["reference"]["answer"]) in _normalize(row["prediction"])
        cells[(row["reference"]["n_images"], row["reference"]["depth"])].append(int(correct))
    sizes = sorted({n for n, _ in cells})
    depths = sorted({d for _, d in cells})
    grid = [[(sum(cells[(n, d)]) / len(cells[(n, d)])) if cells.get((n, d)) else None for n in sizes]
            for d in depths]
    hits = sum(sum(v) for v in cells.values())
    per_n = {str(n): sum(sum(cells[(n, d)]) for d in depths if (n, d) in cells)
             / sum(len(cells[(n, d)]) for d in depths if (n, d) in cells) for n in sizes}
    return {"task": "niah", "n": len(rows), "accuracy": hits / len(rows), "n_images": sizes, "depths": depths,
            "accuracy_grid": grid, "per_n_images": per_n,
            "definition": "correct when the normalised answer 'colour shape' occurs in the normalised prediction",
            "headline": {"accuracy": hits / len(rows)}, "per_class": per_n}


def _binary_prf(pairs: Sequence[tuple[int, int]]) -> dict:
    tp = sum(1 for t, p in pairs if t == 1 and p == 1)
    fp = sum(1 for t, p in pairs if t == 0 and p == 1)
    fn = sum(1 for t, p in pairs if t == 1 and p == 0)
    correct = sum(1 for t, p in pairs if t == p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "support": tp + fn, "n": len(pairs)}


def ct_rate_metrics(rows: Sequence[dict]) -> dict:
    from domain_data.medical.metrics import (
        CT_RATE_ABNORMALITIES,
        ct_rate_scores,
        parse_findings,
        parse_yes_no,
    )

    out: dict[str, Any] = {"task": "ct-rate", "n": len(rows)}
    reports = [r for r in rows if r["reference"].get("kind") == "report"]
    if reports:
        truth = [r["reference"]["labels"] if "labels" in r["reference"] else parse_findings(r["reference"]["answer"])
                 for r in reports]
        pred = [parse_findings(r["prediction"]) for r in reports]
        scores = ct_rate_scores(truth, pred)
        supported = [name for name in CT_RATE_ABNORMALITIES if scores["per_abnormality"][name]["support"] > 0]
        scores["macro_over_present"] = {
            key: (sum(scores["per_abnormality"][a][key] for a in supported) / len(supported)) if supported else None
            for key in ("accuracy", "precision", "recall", "f1")}
        scores["present_abnormalities"] = supported
        out["reports"] = scores
    presence = [r for r in rows if r["reference"].get("kind") == "presence"]
    if presence:
        by_finding: dict[str, list[tuple[int, int]]] = defaultdict(list)
        unparsed = 0
        for row in presence:
            truth_label, predicted = parse_yes_no(row["reference"]["answer"]), parse_yes_no(row["prediction"])
            unparsed += predicted is None
            by_finding[row["reference"].get("finding") or "?"].append((int(truth_label or 0), int(predicted or 0)))
        per = {name: _binary_prf(pairs) for name, pairs in sorted(by_finding.items())}
        all_pairs = [p for pairs in by_finding.values() for p in pairs]
        out["presence"] = {"per_finding": per, "macro_f1": sum(v["f1"] for v in per.values()) / len(per),
                           "yes_no_accuracy": _binary_prf(all_pairs)["accuracy"], "unparsed_answers": unparsed,
                           "definition": "positive-class P/R/F1 per finding over presence questions; "
                                         "an unparsable answer counts as 'no'"}
    others: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        kind = row["reference"].get("kind")
        if kind not in ("report", "presence"):
            others[kind or "other"].append(int(_normalize(row["prediction"]) == _normalize(row["reference"]["answer"])))
    if others:
        out["exact_match"] = {kind: sum(v) / len(v) for kind, v in sorted(others.items())}
    headline: dict[str, float] = {}
    if "presence" in out:
        headline["presence_macro_f1"] = out["presence"]["macro_f1"]
        headline["yes_no_accuracy"] = out["presence"]["yes_no_accuracy"]
        out["per_class"] = {k: v["f1"] for k, v in out["presence"]["per_finding"].items()}
    if "reports" in out:
        headline["report_macro_f1"] = out["reports"]["macro"]["f1"]
        out.setdefault("per_class", {a: out["reports"]["per_abnormality"][a]["f1"]
                                     for a in out["reports"]["present_abnormalities"]})
    out["headline"] = headline
    return out


def fitrsfg_metrics(rows: Sequence[dict]) -> dict:
    from domain_data.remote_sensing.metrics import (
        MULTI_LABEL_SUFFIX,
        SINGLE_LABEL_SUFFIX,
        count_confusion,
        fitrsfg_vqa_scores,
        scene_classification_scores,
        scores_to_dict,
    )

    answers = [{"question_id": r["id"], "answer": r["prediction"], **r["reference"]} for r in rows]
    out: dict[str, Any] = {"task": "fit-rsfg", "n": len(rows), "vqa": scores_to_dict(fitrsfg_vqa_scores(answers))}
    scene = [a for a in answers if a["question"].endswith((SINGLE_LABEL_SUFFIX, MULTI_LABEL_SUFFIX))]
    if scene:
        out["scene_classification"] = scores_to_dict(scene_classification_scores(scene))
    confusion = count_confusion(answers)
    if confusion:
        out["count_confusion"] = confusion
    official = out["vqa"]["official"]
    out["headline"] = {"official_accuracy": official["overall"]["accuracy"],
                       "lenient_accuracy": out["vqa"]["lenient"]["overall"]["accuracy"]}
    out["per_class"] = {k: v["accuracy"] for k, v in official["per_category"].items()}
    return out


def closed_vqa_metrics(rows: Sequence[dict]) -> dict:
    from domain_data.medical.metrics import closed_vqa_accuracy

    overall = closed_vqa_accuracy([r["prediction"] for r in rows], [r["reference"]["options"] for r in rows],
                                  [r["reference"]["answer"] for r in rows])
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_dataset[row["reference"].get("dataset", "")].append(row)
    per = {name: closed_vqa_accuracy([r["prediction"] for r in group], [r["reference"]["options"] for r in group],
                                     [r["reference"]["answer"] for r in group])["accuracy"]
           for name, group in sorted(by_dataset.items())}
    return {"task": "closed-vqa", "n": len(rows), "accuracy": overall["accuracy"], "correct": overall["correct"],
            "per_dataset": per, "headline": {"accuracy": overall["accuracy"]}, "per_class": per,
            "definition": "HuatuoGPT-Vision matching: option letter, else option text, else closest option"}


METRICS: dict[str, Callable[[Sequence[dict]], dict]] = {
    "niah": niah_metrics, "ct-rate": ct_rate_metrics, "fit-rsfg": fitrsfg_metrics, "closed-vqa": closed_vqa_metrics,
}


# ----------------------------------------------------------------------------------------------
# Report: markdown + charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(per_class: dict[str, float], path: Path, title: str, ylabel: str) -> None:
    plt = _pyplot()
    names = list(per_class)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.8), dpi=100)
    axis.bar(range(len(names)), [per_class[n] or 0.0 for n in names], color="#4C72B0")
    axis.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def niah_heatmap(metrics: dict, path: Path) -> None:
    """Accuracy over (number of images, needle depth), like the paper's NIAH figure."""
    import numpy as np

    plt = _pyplot()
    grid = np.array([[np.nan if v is None else v for v in row] for row in metrics["accuracy_grid"]], dtype=float)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.5 * grid.shape[1] + 2.5), max(3.0, 0.4 * grid.shape[0] + 1.5)),
                                dpi=100)
    image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(metrics["n_images"])), [str(n) for n in metrics["n_images"]])
    axis.set_yticks(range(len(metrics["depths"])), [f"{d:.0%}" for d in metrics["depths"]])
    axis.set_xlabel("number of images")
    axis.set_ylabel("needle depth")
    axis.set_title(f"needle in a haystack: accuracy {metrics['accuracy']:.1%}")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def count_confusion_heatmap(confusion: dict, path: Path) -> None:
    """True count (rows) x count answered (columns), each cell the share of its row's questions, annotated
    with the number of questions."""
    import numpy as np

    plt = _pyplot()
    counts = np.array(confusion["matrix"], dtype=float)  # (truths, answers)
    shares = counts / counts.sum(axis=1, keepdims=True)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.55 * counts.shape[1] + 2.5), max(3.0, 0.45 * counts.shape[0] + 1.8)),
                                dpi=100)
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (row, column), n in np.ndenumerate(counts):
        if n:
            axis.text(column, row, str(int(n)), ha="center", va="center", fontsize=8,
                      color="white" if shares[row, column] > 0.6 else "black")
    axis.set_xticks(range(len(confusion["answers"])), confusion["answers"])
    axis.set_yticks(range(len(confusion["truths"])), [str(t) for t in confusion["truths"]])
    axis.set_xlabel("count answered")
    axis.set_ylabel("true count")
    right = sum(v["correct"] for v in confusion["per_truth"].values())
    axis.set_title(f"counting: {right} of {confusion['questions']} answered right (read leniently)")
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of the true count's questions")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _count_confusion_lines(confusion: dict) -> list[str]:
    """report.md's counting table: per true count, its questions, those answered right and the most
    common answer."""
    lines = ["", "Counting questions by true count (answers read leniently; a diagnostic, not the benchmark's score):",
             "", "| true count | questions | answered right | most common answer |", "|---|---|---|---|"]
    for truth, row in zip(confusion["truths"], confusion["matrix"], strict=True):
        scores = confusion["per_truth"][str(truth)]
        common = confusion["answers"][max(range(len(row)), key=row.__getitem__)]
        lines.append(f"| {truth} | {scores['total']} | {scores['correct']} ({scores['accuracy']:.0%}) | {common} |")
    return lines


def write_report(task: str, metrics: dict, out_dir: Path, model: str, data: str) -> list[Path]:
    """report.md plus the chart PNG(s); returns the files written."""
    written = []
    chart = out_dir / "per_class.png"
    ylabel = {"ct-rate": "F1 (positive class)", "niah": "accuracy"}.get(task, "accuracy")
    if metrics.get("per_class"):
        bar_chart(metrics["per_class"], chart, f"{task}: per class", ylabel)
        written.append(chart)
    if task == "niah":
        heatmap = out_dir / "niah_heatmap.png"
        niah_heatmap(metrics, heatmap)
        written.append(heatmap)
    if metrics.get("count_confusion"):
        heatmap = out_dir / "count_confusion.png"
        count_confusion_heatmap(metrics["count_confusion"], heatmap)
        written.append(heatmap)
    lines = [f"# Evaluation: {task}", "", f"- model: `{model}`", f"- data: `{data}`", f"- items: {metrics['n']}", ""]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics["headline"].items()]
    if metrics.get("per_class"):
        lines += ["", f"| class | {ylabel} |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics["per_class"].items()]
    if metrics.get("count_confusion"):
        lines += _count_confusion_lines(metrics["count_confusion"])
    if metrics.get("definition"):
        lines += ["", f"Definition: {metrics['definition']}"]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in written), ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return [report, *written]


# ----------------------------------------------------------------------------------------------
# The run


def model_render_defaults(model_path: str | Path) -> dict:
    """The render options a model folder records in ``longllava_defaults.json`` (written by training:
    the slice count / image size / tile size / tile cap it was trained with); ``{}`` when absent."""
    from finetune.train import INFERENCE_DEFAULTS_FILE
    from longllava.errors import UserInputError
    from longllava.loading import resolve_model_dir

    try:
        path = resolve_model_dir(model_path) / INFERENCE_DEFAULTS_FILE
    except UserInputError:
        return {}  # loading the model reports the problem with the path
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("render") or {})
    except (json.JSONDecodeError, AttributeError) as error:
        raise FinetuneError(f"{path}: not a JSON object with a 'render' mapping ({error}); fix or delete it") from None


def evaluate(task: str, model_path: str, data: str, out_dir: str | Path, batch_size: int = 4,
             max_new_tokens: int | None = None, limit: int | None = None, split: str | None = None,
             render: dict | None = None, on_batch: Callable[[int, int], None] | None = None,
             loaded: tuple[Any, Any] | None = None, long_context_tokens: int = 8192) -> EvalResult:
    """Predict the items not yet in ``OUT/predictions.jsonl``, then score all and write the report.

    ``on_batch(done, total)`` is called after each saved batch. ``loaded`` = (model, processor) skips
    loading ``model_path`` (it is still recorded in ``run.json``).
    """
    from tqdm.auto import tqdm

    if task not in METRICS:
        raise FinetuneError(f"unknown task {task!r}; use {', '.join(METRICS)}")
    if batch_size < 1:
        raise FinetuneError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, task, model_path, data)
    if render is None:
        render = model_render_defaults(model_path)
    items = load_items(task, data, out, split, render)
    if limit is not None:
        items = items[:limit]
    predictions_path = out / "predictions.jsonl"
    done = read_predictions(predictions_path)
    todo = [item for item in items if item.id not in done]
    generated = 0
    if todo:
        from finetune.merge import load_trained
        from finetune.train import install_fast_scan_if_available

        install_fast_scan_if_available()
        model, processor = loaded if loaded is not None else load_trained(model_path)
        generate = Generator(model, processor, max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task], long_context_tokens)
        cache_dir = out / "image_cache"
        progress = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"evaluate {task}", unit="item")
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts, images = zip(*(item_prompt(item, cache_dir) for item in batch))
            answers = generate(prompts, images)
            rows = [{"id": item.id, "prediction": answer, "reference": item.reference}
                    for item, answer in zip(batch, answers)]
            append_predictions(predictions_path, rows)
            generated += len(rows)
            progress.update(len(rows))
            if on_batch is not None:
                on_batch(len(items) - len(todo) + generated, len(items))
        progress.close()
    done = read_predictions(predictions_path)
    rows = [done[item.id] for item in items if item.id in done]
    metrics = METRICS[task](rows)
    metrics["model"], metrics["data"] = str(model_path), str(data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(task, metrics, out, str(model_path), str(data))
    return EvalResult(task, out, metrics, generated)
