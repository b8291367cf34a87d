"""Questions and canonical answers against ground truth; NIAH needles."""

from __future__ import annotations

import numpy as np
import pytest

from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS, make_ct_phantom
from domain_data.synthetic.errors import SyntheticDataError
from domain_data.synthetic.niah import NEEDLE_COLOURS, NEEDLE_SHAPES, haystack_image, make_niah
from domain_data.synthetic.qa import (
    ct_questions,
    ct_report,
    llava_record,
    map_slice_range,
    scene_questions,
    slice_range_text,
)
from domain_data.synthetic.satellite import make_scene


def by_kind(questions, kind, key, value):
    return [q for q in questions if q["kind"] == kind and q.get(key) == value]


def test_ct_questions_match_ground_truth():
    phantom = make_ct_phantom(
        14,
        findings={"Lung nodule": {"count": 2, "side": "left"}, "Pleural effusion": {"side": "both"}},
        n_slices=60,
        size=80,
    )
    questions = ct_questions(phantom)
    for name in RENDERABLE_FINDINGS:
        (presence,) = by_kind(questions, "presence", "finding", name)
        assert presence["answer"] == ("Yes" if phantom.findings[name].present else "No")
    assert by_kind(questions, "count", "finding", "Lung nodule")[0]["answer"] == "2"
    assert by_kind(questions, "side", "finding", "Lung nodule")[0]["answer"] == "left"
    assert by_kind(questions, "side", "finding", "Pleural effusion")[0]["answer"] == "both"
    first, last = phantom.findings["Pleural effusion"].slices
    assert (
        by_kind(questions, "slices", "finding", "Pleural effusion")[0]["answer"] == f"{first + 1}-{last + 1}"
    )
    assert not by_kind(questions, "side", "finding", "Emphysema")  # absent: presence only
    assert ct_questions(phantom) == questions  # seeded paraphrases


def test_no_nodules_count_zero_and_report_says_normal():
    phantom = make_ct_phantom(15, findings=[], n_slices=40, size=64)
    questions = ct_questions(phantom)
    assert by_kind(questions, "count", "finding", "Lung nodule")[0]["answer"] == "0"
    assert {q["answer"] for q in questions} == {"No", "0"}
    report = ct_report(phantom)
    assert report["impressions"] == "No significant pathology."
    assert "No pleural effusion" in report["findings"] and "No mass or nodule" in report["findings"]


def test_report_mentions_every_present_finding():
    phantom = make_ct_phantom(16, findings=list(RENDERABLE_FINDINGS), n_slices=60, size=80)
    report = ct_report(phantom)
    for word in ("Cardiomegaly", "pleural effusion", "Emphysema", "Consolidation", "lung nodule"):
        assert word.lower() in report["impressions"].lower()
    assert slice_range_text(phantom.findings["Consolidation"].slices) in report["findings"]


def test_slice_range_mapping():
    assert map_slice_range("1-200", 200, 100) == "1-100"
    assert map_slice_range("101-101", 201, 101) == "51-51"
    with pytest.raises(ValueError):
        map_slice_range("5-300", 200, 100)


def test_scene_questions_match_objects():
    scene = make_scene(
        21, 672, 1008, objects={"ship": 2, "storage tank": 0, "building": {"count": 3, "tile": (1, 3)}}
    )
    questions = scene_questions(scene)
    assert by_kind(questions, "count", "object", "ship")[0]["answer"] == "2"
    assert by_kind(questions, "presence", "object", "storage tank")[0]["answer"] == "No"
    assert not by_kind(questions, "row", "object", "storage tank")
    assert by_kind(questions, "tile", "object", "building")[0]["answer"] == "row 1, column 3"
    assert by_kind(questions, "row", "object", "building")[0]["answer"] == "1"
    assert by_kind(questions, "column", "object", "building")[0]["answer"] == "3"
    ((row, col),) = scene.tiles_with("ship")
    assert by_kind(questions, "tile", "object", "ship")[0]["answer"] == f"row {row}, column {col}"


def test_spread_objects_list_rows():
    scene = make_scene(22, 1008, 1008, objects={"building": {"count": 12, "spread": True}})
    rows = sorted({r for r, _ in scene.tiles_with("building")})
    answer = by_kind(scene_questions(scene), "row", "object", "building")[0]["answer"]
    assert answer == ", ".join(map(str, rows))


def test_llava_record_has_one_image_placeholder():
    qa = [
        {"question": "Q1?", "answer": "Yes", "kind": "presence"},
        {"question": "Q2?", "answer": "3", "kind": "count"},
    ]
    record = llava_record("r", "a.tif", "grid", qa)
    text = "".join(turn["value"] for turn in record["conversations"])
    assert text.count("<image>") == 1 and record["conversations"][0]["value"].startswith("<image>\n")
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "human", "gpt"]


def test_niah_needle_position_and_distinctness():
    sample = make_niah(3, 50, 0.5, size=64)
    assert len(sample.images) == 50 and sample.needle_index == 24
    assert sample.colour in NEEDLE_COLOURS and sample.shape in NEEDLE_SHAPES
    assert sample.answer == f"{sample.colour} {sample.shape}"
    target = np.array(NEEDLE_COLOURS[sample.colour])

    def needle_pixels(image):
        return int(np.all(np.abs(image.astype(int) - target) <= 2, axis=-1).sum())

    counts = [needle_pixels(image) for image in sample.images]
    assert counts[24] > 0.05 * 64 * 64 and max(counts[:24] + counts[25:]) == 0
    longer = make_niah(3, 200, 0.0, size=64)  # haystack image i depends on (seed, i) only
    np.testing.assert_array_equal(longer.images[10], sample.images[10])
    np.testing.assert_array_equal(haystack_image(3, 10, 64), sample.images[10])
    assert make_niah(3, 10, 1.0, size=64).needle_index == 9
    with pytest.raises(SyntheticDataError):
        make_niah(3, 10, 1.5)
