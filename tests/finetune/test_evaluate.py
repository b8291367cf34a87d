"""Evaluation end to end on seeded synthetic sets: predictions, resume, metrics, report and charts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import FinetuneError
from finetune.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    closed_vqa_metrics,
    ct_rate_metrics,
    evaluate,
    fitrsfg_metrics,
    niah_metrics,
    read_predictions,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_default_generation_caps_fit_the_longest_synthetic_answers_in_the_demo_tokenizer():
    from transformers import AutoTokenizer

    from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS, make_ct_phantom
    from domain_data.synthetic.niah import NEEDLE_COLOURS, NEEDLE_SHAPES
    from domain_data.synthetic.qa import ct_report_text
    from longllava.loading import DEMO_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)

    def longest(answers) -> int:
        return max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)

    needles = [f"{colour} {shape}" for colour in NEEDLE_COLOURS for shape in NEEDLE_SHAPES]
    assert longest(needles) >= 9 > 8  # "yellow triangle": the old cap of 8 cut it
    assert longest(needles) < DEFAULT_MAX_NEW_TOKENS["niah"]
    # every finding, on both sides, slice numbers in the hundreds: the longest report the generator writes
    everything = {name: {"side": "both"} for name in RENDERABLE_FINDINGS} | {"Lung nodule": {"count": 3}}
    report = ct_report_text(make_ct_phantom(0, everything, n_slices=300, size=64))
    assert 160 < longest([report]) < DEFAULT_MAX_NEW_TOKENS["ct-rate"]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_base):
    from longllava.loading import load_model

    return load_model(tiny_base)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_niah_end_to_end_writes_metrics_report_and_heatmap(tmp_path, tiny_base, tiny_loaded):
    spec = "synthetic:n_images=2,3;depths=0,1;seed=3;size=56"
    result = evaluate("niah", str(tiny_base), spec, tmp_path, batch_size=3, max_new_tokens=4, loaded=tiny_loaded)
    rows = _rows(tmp_path / "predictions.jsonl")
    assert result.generated == len(rows) == 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == [2, 3] and metrics["depths"] == [0.0, 1.0]
    recomputed = sum(r["reference"]["answer"] in r["prediction"].lower() for r in rows) / len(rows)
    assert metrics["accuracy"] == pytest.approx(recomputed)
    assert _is_png(tmp_path / "niah_heatmap.png") and _is_png(tmp_path / "per_class.png")
    report = (tmp_path / "report.md").read_text()
    assert "# Evaluation: niah" in report and "niah_heatmap.png" in report
    # every item has its own seeded needle image among the haystack
    assert len({r["reference"]["answer"] for r in rows}) >= 2
    assert len(list((tmp_path / "niah_images").glob("*/0000.png"))) == 4


def test_interrupted_evaluation_resumes_without_duplicates(tmp_path, tiny_base, tiny_loaded):
    spec = "synthetic:n_images=2;depths=0,0.5,1;seed=1;size=56;repeats=2"  # 6 items

    def stop_after_first_batch(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate("niah", str(tiny_base), spec, tmp_path, batch_size=2, max_new_tokens=3, loaded=tiny_loaded,
                 on_batch=stop_after_first_batch)
    first = _rows(tmp_path / "predictions.jsonl")
    assert len(first) == 2 and not (tmp_path / "metrics.json").exists()
    with (tmp_path / "predictions.jsonl").open("a") as handle:  # a write cut off by the kill
        handle.write('{"id": "niah_n2_d0.500_r0", "predic')
    seen = []
    result = evaluate("niah", str(tiny_base), spec, tmp_path, batch_size=2, max_new_tokens=3, loaded=tiny_loaded,
                      on_batch=lambda done, total: seen.append((done, total)))
    assert result.generated == 4 and seen == [(4, 6), (6, 6)]
    rows = _rows(tmp_path / "predictions.jsonl")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6 and rows[:2] == first
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 6
    again = evaluate("niah", str(tiny_base), spec, tmp_path, loaded=tiny_loaded)  # nothing left to do
    assert again.generated == 0 and len(read_predictions(tmp_path / "predictions.jsonl")) == 6
    with pytest.raises(FinetuneError, match="another run"):
        evaluate("niah", "other-model", spec, tmp_path, loaded=tiny_loaded)


def test_ct_rate_and_fit_rsfg_on_synthetic_sets(tmp_path, tiny_base, tiny_loaded, synthetic_sets):
    ct = evaluate("ct-rate", str(tiny_base), str(synthetic_sets / "ct_test.jsonl"), tmp_path / "ct", batch_size=4,
                  max_new_tokens=4, render={"num_slices": 2, "size": 56}, loaded=tiny_loaded)
    assert ct.metrics["n"] == 11 and set(ct.metrics["presence"]["per_finding"]) == {
        "Cardiomegaly", "Consolidation", "Emphysema", "Lung nodule", "Pleural effusion"}
    assert {"reports", "exact_match", "headline"} <= set(ct.metrics)
    assert _is_png(tmp_path / "ct" / "per_class.png")
    rs = evaluate("fit-rsfg", str(tiny_base), str(synthetic_sets / "rs_test_fitrsfg.jsonl"), tmp_path / "rs",
                  batch_size=5, max_new_tokens=3, render={"tile_size": 56, "max_tiles": 4}, loaded=tiny_loaded, limit=5)
    assert rs.metrics["n"] == 5 and "count" in rs.metrics["vqa"]["official"]["per_category"]
    assert _is_png(tmp_path / "rs" / "per_class.png") and "official_accuracy" in rs.metrics["headline"]
    assert _is_png(tmp_path / "rs" / "count_confusion.png") and rs.metrics["count_confusion"]["questions"] >= 1
    assert "| true count | questions |" in (tmp_path / "rs" / "report.md").read_text()
    built_niah = evaluate("niah", str(tiny_base), str(synthetic_sets / "niah_test.jsonl"), tmp_path / "niah",
                          max_new_tokens=3, loaded=tiny_loaded)
    assert built_niah.metrics["n_images"] == [4] and built_niah.metrics["n"] == 2


def test_niah_metrics_grid_by_hand():
    def row(n, depth, answer, prediction):
        return {"prediction": prediction, "reference": {"answer": answer, "n_images": n, "depth": depth}}

    rows = [row(10, 0.0, "red circle", "A red circle."), row(10, 1.0, "blue cross", "green cross"),
            row(20, 0.0, "red square", "red  SQUARE"), row(20, 0.0, "red square", "square"),
            row(20, 1.0, "green circle", "It is a green circle")]
    metrics = niah_metrics(rows)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["accuracy_grid"] == [[1.0, 0.5], [0.0, 1.0]]  # rows: depth 0, 1; columns: 10, 20 images
    assert metrics["per_n_images"] == {"10": 0.5, "20": pytest.approx(2 / 3)}


def test_ct_presence_metrics_by_hand():
    def row(finding, truth, prediction):
        return {"prediction": prediction, "reference": {"kind": "presence", "finding": finding, "answer": truth}}

    rows = [row("Cardiomegaly", "Yes", "Yes"), row("Cardiomegaly", "Yes", "No"), row("Cardiomegaly", "No", "Yes."),
            row("Cardiomegaly", "No", "no"), row("Emphysema", "Yes", "yes"), row("Emphysema", "No", "maybe")]
    metrics = ct_rate_metrics(rows)["presence"]
    cardio = metrics["per_finding"]["Cardiomegaly"]  # TP 1, FN 1, FP 1, TN 1
    assert (cardio["precision"], cardio["recall"], cardio["f1"], cardio["accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    assert metrics["per_finding"]["Emphysema"]["f1"] == 1.0  # "maybe" counts as no, truth no
    assert metrics["macro_f1"] == 0.75 and metrics["yes_no_accuracy"] == pytest.approx(4 / 6)
    assert metrics["unparsed_answers"] == 1


def test_fitrsfg_metrics_follow_the_official_rule():
    rows = [{"id": "1", "prediction": "Yes.", "reference": {"ground_truth": "yes", "category": "presence",
                                                            "question": "Is there a ship?"}},
            {"id": "2", "prediction": " 3 ", "reference": {"ground_truth": "3", "category": "count",
                                                           "question": "How many?"}}]
    metrics = fitrsfg_metrics(rows)
    assert metrics["per_class"] == {"count": 1.0, "presence": 0.0}  # "Yes." != "yes" officially
    assert metrics["headline"] == {"official_accuracy": 0.5, "lenient_accuracy": 1.0}
    assert metrics["count_confusion"]["matrix"] == [[1]] and metrics["count_confusion"]["truths"] == [3]


def test_closed_vqa_end_to_end(tmp_path, tiny_base, tiny_loaded):
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "a.png")
    questions = [{"qid": i, "image": "a.png", "question": f"Is the organ {w}?", "options": ["yes", "no"],
                  "answer": "A" if i % 2 else "no", "dataset": "VQA-RAD"} for i, w in enumerate(["big", "red", "ok"])]
    (tmp_path / "vqa.json").write_text(json.dumps(questions))
    result = evaluate("closed-vqa", str(tiny_base), str(tmp_path / "vqa.json"), tmp_path / "out", max_new_tokens=2,
                      loaded=tiny_loaded)
    rows = _rows(tmp_path / "out" / "predictions.jsonl")
    assert result.metrics["n"] == 3 and rows[1]["reference"]["answer"] == "yes"
    by_hand = closed_vqa_metrics([{**r, "prediction": "B"} for r in rows])
    assert by_hand["accuracy"] == pytest.approx(2 / 3)  # B = "no" is right for items 0 and 2
    with pytest.raises(FinetuneError, match="not found"):
        evaluate("closed-vqa", str(tiny_base), str(tmp_path / "missing.json"), tmp_path / "x", loaded=tiny_loaded)


def test_batched_and_long_context_generation_match_one_by_one(tmp_path, tiny_base, tiny_loaded):
    spec = "synthetic:n_images=1,3;depths=0,1;seed=2;size=56"  # prompts of different lengths: left padding
    predictions = {}
    for name, batch_size, long_context_tokens in (("single", 1, 8192), ("batched", 4, 8192), ("session", 4, 1)):
        evaluate("niah", str(tiny_base), spec, tmp_path / name, batch_size=batch_size, max_new_tokens=5,
                 loaded=tiny_loaded, long_context_tokens=long_context_tokens)
        predictions[name] = [r["prediction"] for r in _rows(tmp_path / name / "predictions.jsonl")]
    # "session": every prompt goes through LongContextSession (batched image encoding, chunked prefill)
    assert predictions["single"] == predictions["batched"] == predictions["session"]
    assert any(predictions["single"])


def _fake_ct_rate_root(root: Path) -> Path:
    """A CT-RATE-layout folder with two seeded phantom volumes, reports and the 18 labels."""
    import csv

    from domain_data.medical.metrics import CT_RATE_ABNORMALITIES
    from domain_data.synthetic.ct_phantom import phantom_hu, write_volume_nifti

    names = ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    for i, name in enumerate(names):
        folder = root / "dataset/valid" / name[:7] / name[:9]
        folder.mkdir(parents=True)
        write_volume_nifti(phantom_hu(6, 40, 40, seed=i), (2.0, 0.7, 0.7), folder / name, dtype="float32")
    (root / "dataset/radiology_text_reports").mkdir(parents=True)
    with open(root / "dataset/radiology_text_reports/validation_reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        writer.writerows([[names[0], "Cardiomegaly is present.", "Cardiomegaly."],
                          [names[1], "No pleural effusion.", "Normal."]])
    (root / "dataset/multi_abnormality_labels").mkdir(parents=True)
    with open(root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", *CT_RATE_ABNORMALITIES])
        writer.writerow([names[0], *[int(a == "Cardiomegaly") for a in CT_RATE_ABNORMALITIES]])
        writer.writerow([names[1], *[0] * len(CT_RATE_ABNORMALITIES)])
    return root


def test_ct_rate_release_layout_for_training_records_and_evaluation(tmp_path, tiny_base, tiny_loaded):
    from finetune.data import load_records

    root = _fake_ct_rate_root(tmp_path / "CT-RATE")
    records = load_records(f"ct-rate:{root}:valid", render_defaults={"num_slices": 2})
    assert [r.id for r in records] == ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    assert records[0].conversations[1]["value"] == "Findings: Cardiomegaly is present.\nImpressions: Cardiomegaly."
    assert records[0].ct.is_file() and records[0].layout == "series"
    result = evaluate("ct-rate", str(tiny_base), str(root), tmp_path / "eval", max_new_tokens=4,
                      render={"num_slices": 2, "size": 56}, loaded=tiny_loaded)
    reports = result.metrics["reports"]
    assert result.metrics["n"] == 2 and len(reports["per_abnormality"]) == 18
    assert reports["present_abnormalities"] == ["Cardiomegaly"]
    assert (tmp_path / "eval" / "report.md").is_file()
