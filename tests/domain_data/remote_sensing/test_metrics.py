"""FIT-RSFG scores: the official rule reproduced on hand-made items, the lenient variant beside it."""

from __future__ import annotations

import random

import pytest

from domain_data.remote_sensing.errors import DatasetInputError
from domain_data.remote_sensing.metrics import (
    MULTI_LABEL_SUFFIX,
    SINGLE_LABEL_SUFFIX,
    count_confusion,
    fitrsfg_vqa_scores,
    lenient_normalize,
    official_vqa_correct,
    read_count,
    scene_classification_scores,
    scene_mode,
    scores_to_dict,
)


@pytest.mark.parametrize("truth, answer, official, lenient", [
    ("yes", "yes", True, True),
    ("Yes", "  yes\n", True, True),  # the answer is stripped, case is ignored
    ("yes", "Yes.", False, True),  # punctuation counts under the official rule
    ("yes ", "yes", False, True),  # the ground truth is not stripped
    ("2", "two", False, True),
    ("storage_tank", "Storage tank", False, True),
    ("airplane", "the airplane", False, True),
    ("3.5", "3 5", False, False),  # a decimal point between digits is kept
    ("no", "yes", False, False),
])
def test_official_and_lenient_rules(truth, answer, official, lenient):
    assert official_vqa_correct(truth, answer) is official
    assert (lenient_normalize(truth) == lenient_normalize(answer)) is lenient


def test_vqa_accuracy_per_category_and_micro_overall():
    items = [
        {"category": "Counting", "ground_truth": "3", "answer": "3"},
        {"category": "counting", "ground_truth": "2", "answer": "two"},
        {"category": "Counting", "ground_truth": "1", "answer": "1 "},
        {"category": "presence", "ground_truth": "yes", "answer": "Yes."},
    ]
    scores = fitrsfg_vqa_scores(items)
    official, lenient = scores["official"], scores["lenient"]
    assert (official["per_category"]["counting"].correct, official["per_category"]["counting"].total) == (2, 3)
    assert official["per_category"]["presence"].value == 0.0
    assert official["overall"].value == pytest.approx(2 / 4)  # micro: 2 of 4 questions, not mean of 2/3 and 0
    assert lenient["overall"].value == 1.0
    assert scores_to_dict(scores)["official"]["overall"] == {"accuracy": 0.5, "correct": 2, "total": 4}


def _official_vqa_reference(rows: list[dict]) -> tuple[dict, float]:
    """The official script's loop, written out: generation strips the answer, scoring lowercases."""
    correct: dict[str, int] = {}
    wrong: dict[str, int] = {}
    for row in rows:
        answer = row["answer"].strip()
        category = row["category"].lower()
        correct.setdefault(category, 0)
        wrong.setdefault(category, 0)
        if row["ground_truth"].lower() == answer.lower():
            correct[category] += 1
        else:
            wrong[category] += 1
    per = {c: correct[c] / (correct[c] + wrong[c]) for c in correct}
    return per, sum(correct.values()) / (sum(correct.values()) + sum(wrong.values()))


def test_matches_the_official_loop_on_seeded_items():
    rng = random.Random(0)
    truths = ["yes", "no", "3", "airplane", "Storage_Tank", "ship "]
    variants = [lambda s: s, str.upper, lambda s: s + ".", lambda s: f"  {s}\n", lambda s: "no", str.title]
    rows = []
    for index in range(400):
        truth = rng.choice(truths)
        rows.append({"question_id": index, "category": rng.choice(["Counting", "presence", "Color"]),
                     "ground_truth": truth, "answer": rng.choice(variants)(truth)})
    per, overall = _official_vqa_reference(rows)
    scores = fitrsfg_vqa_scores(rows)["official"]
    assert scores["overall"].value == pytest.approx(overall)
    assert {c: a.value for c, a in scores["per_category"].items()} == pytest.approx(per)
    assert 0.2 < overall < 0.9  # the seeded mix exercises both outcomes


def test_scene_classification_single_and_multi_label():
    single, multi = f"Classify the scene. {SINGLE_LABEL_SUFFIX}", f"Which objects? {MULTI_LABEL_SUFFIX}"
    items = [
        {"question": single, "ground_truth": "Airport", "answer": "airport"},
        {"question": single, "ground_truth": "harbor", "answer": "Harbor."},
        {"question": multi, "ground_truth": "ship, harbor, storage_tank", "answer": "harbor, ship, bridge"},
        {"text": multi, "ground_truth": "airplane", "answer": "airplane,"},  # trailing comma: '' label
    ]
    scores = scene_classification_scores(items)
    official, lenient = scores["official"], scores["lenient"]
    assert (official["single"].correct, official["single"].total) == (1, 2)
    assert (official["multi"].tp, official["multi"].fp, official["multi"].fn) == (3, 2, 1)
    assert official["multi"].precision == pytest.approx(0.6) and official["multi"].recall == pytest.approx(0.75)
    assert official["multi"].f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert lenient["single"].value == 1.0
    assert (lenient["multi"].tp, lenient["multi"].fp, lenient["multi"].fn) == (3, 1, 1)


def test_scene_mode_and_bad_items():
    assert scene_mode(f"x {SINGLE_LABEL_SUFFIX}") == "single" and scene_mode(f"x {MULTI_LABEL_SUFFIX}") == "multi"
    with pytest.raises(DatasetInputError, match="neither"):
        scene_mode("What is this?")
    with pytest.raises(DatasetInputError, match="'answer' must be text"):
        fitrsfg_vqa_scores([{"question_id": 7, "category": "c", "ground_truth": "yes", "answer": None}])
    with pytest.raises(DatasetInputError, match="no answers"):
        fitrsfg_vqa_scores([])


def test_count_confusion_reads_numbers_leniently_and_tabulates_truth_against_answer():
    rows = [{"category": "Object counting", "ground_truth": "3", "answer": answer}
            for answer in ("4", "three", "3 ships.", "many")]
    rows += [{"category": "count", "ground_truth": "0", "answer": "0"},
             {"category": "count", "ground_truth": "some", "answer": "2"},  # not a whole number: left out
             {"category": "presence", "ground_truth": "yes", "answer": "3"}]  # not a counting question
    confusion = count_confusion(rows)
    assert confusion["truths"] == [0, 3] and confusion["answers"] == ["0", "3", "4", "none"]
    assert confusion["matrix"] == [[1, 0, 0, 0], [0, 2, 1, 1]]
    assert confusion["per_truth"]["3"] == {"accuracy": 0.5, "correct": 2, "total": 4}
    assert confusion["mean_absolute_error"] == pytest.approx(1 / 4)  # |3-4| over the 4 answers read
    assert (confusion["unread"], confusion["questions"], confusion["left_out"]) == (1, 5, 1)
    assert read_count("Two ships and a tank") == 2 and read_count("3.5") is None and read_count("") is None
    assert count_confusion(rows[-1:]) is None
    never_right = count_confusion([{"category": "count", "ground_truth": "5", "answer": "4"}])
    assert never_right["answers"] == ["4", "5"] and never_right["matrix"] == [[1, 0]]  # the diagonal is kept
