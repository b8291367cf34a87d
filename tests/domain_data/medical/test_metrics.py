"""CT-RATE and closed-VQA metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from domain_data.medical.errors import MedicalDatasetError
from domain_data.medical.metrics import (
    CT_RATE_ABNORMALITIES,
    apply_thresholds,
    choose_thresholds,
    closed_vqa_accuracy,
    ct_rate_scores,
    ct_rate_scores_from_probabilities,
    match_option,
    parse_findings,
    parse_yes_no,
)


def test_abnormality_names_exact() -> None:
    assert len(CT_RATE_ABNORMALITIES) == 18
    assert CT_RATE_ABNORMALITIES[0] == "Medical material"
    assert CT_RATE_ABNORMALITIES[-1] == "Interlobular septal thickening"
    assert "Pulmonary fibrotic sequela" in CT_RATE_ABNORMALITIES


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((4, 18), dtype=int)
    pred = np.zeros((4, 18), dtype=int)
    truth[:, 0], pred[:, 0] = [1, 1, 0, 0], [1, 0, 1, 0]  # TP1 FP1 FN1 TN1
    truth[:, 1], pred[:, 1] = [1, 1, 1, 0], [1, 1, 0, 0]  # TP2 FP0 FN1 TN1
    return truth, pred


def test_ct_rate_scores_hand_computed() -> None:
    truth, pred = _hand_case()
    scores = ct_rate_scores(truth, pred)
    first = scores["per_abnormality"]["Medical material"]
    assert first == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                   "ctclip_weighted_f1": 0.5, "support": 2})
    second = scores["per_abnormality"]["Arterial wall calcification"]
    assert second["precision"] == 1.0 and second["recall"] == pytest.approx(2 / 3)
    assert second["f1"] == pytest.approx(0.8) and second["accuracy"] == 0.75
    # weighted: class 1 F1 0.8 (support 3), class 0 P 1/2 R 1 -> F1 2/3 (support 1)
    assert second["ctclip_weighted_f1"] == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)
    empty = scores["per_abnormality"]["Cardiomegaly"]  # no positives at all: defined as 0, accuracy 1
    assert (empty["precision"], empty["recall"], empty["f1"], empty["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    macro = scores["macro"]
    assert macro["precision"] == pytest.approx(1.5 / 18)
    assert macro["recall"] == pytest.approx((0.5 + 2 / 3) / 18)
    assert macro["f1"] == pytest.approx(1.3 / 18)
    assert macro["accuracy"] == pytest.approx((0.5 + 0.75 + 16) / 18)
    p, r = macro["precision"], macro["recall"]
    assert macro["f1_of_macro_pr"] == pytest.approx(2 * p * r / (p + r))
    assert scores["n"] == 4


def test_f1_is_harmonic_mean_of_p_and_r_per_class() -> None:
    """LongLLaVA's table relation F1 = 2PR / (P + R) holds for every abnormality."""
    rng = np.random.default_rng(7)
    truth = (rng.random((60, 18)) < 0.3).astype(int)
    pred = np.where(rng.random((60, 18)) < 0.7, truth, 1 - truth)
    for name, row in ct_rate_scores(truth, pred)["per_abnormality"].items():
        p, r = row["precision"], row["recall"]
        assert row["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0), name
    # and the table's CT-CLIP row (P 73.8, R 30.4) gives its F1 43.0 by the same formula
    assert 2 * 73.8 * 30.4 / (73.8 + 30.4) == pytest.approx(43.0, abs=0.1)


def test_label_dicts_accepted_and_shapes_checked() -> None:
    truth, pred = _hand_case()
    as_dicts = [dict(zip(CT_RATE_ABNORMALITIES, row)) for row in truth]
    assert ct_rate_scores(as_dicts, pred) == ct_rate_scores(truth, pred)
    with pytest.raises(MedicalDatasetError, match="shape"):
        ct_rate_scores(truth[:, :5], pred[:, :5])
    with pytest.raises(MedicalDatasetError, match="0 or 1"):
        ct_rate_scores(truth, pred * 0.5 + 0.2)


def test_thresholds_tuned_on_separate_split() -> None:
    tune_truth = np.zeros((6, 18), dtype=int)
    tune_truth[:, 0] = [1, 1, 1, 0, 0, 0]
    tune_prob = np.full((6, 18), 0.1)
    tune_prob[:, 0] = [0.9, 0.8, 0.35, 0.3, 0.2, 0.1]  # best F1 = 1 for any threshold in (0.30, 0.35]
    thresholds = choose_thresholds(tune_truth, tune_prob)
    assert 0.30 < thresholds[0] <= 0.35
    np.testing.assert_array_equal(apply_thresholds(tune_prob, thresholds)[:, 0], tune_truth[:, 0])
    test_truth, test_prob = tune_truth.copy(), tune_prob.copy()
    scores = ct_rate_scores_from_probabilities(tune_truth, tune_prob, test_truth, test_prob)
    assert scores["per_abnormality"]["Medical material"]["f1"] == 1.0
    assert "thresholds" in scores
    with pytest.raises(MedicalDatasetError, match="separate split"):
        ct_rate_scores_from_probabilities(tune_truth, tune_prob, test_truth, tune_prob)


def test_parse_findings_negation_and_mentions() -> None:
    text = ("No pleural effusion. Mild cardiomegaly is present. There is no evidence of emphysema; "
            "bilateral atelectasis. Coronary artery calcification noted. Without consolidation, "
            "a 5 mm lung nodule in the right upper lobe.")
    labels = parse_findings(text)
    positives = {name for name, value in labels.items() if value}
    assert positives == {"Cardiomegaly", "Atelectasis", "Coronary artery wall calcification"}
    assert set(labels) == set(CT_RATE_ABNORMALITIES)


def test_parse_findings_but_clause_and_explicit_answers() -> None:
    labels = parse_findings("No consolidation but there is a lung nodule.")
    assert labels["Lung nodule"] == 1 and labels["Consolidation"] == 0
    explicit = parse_findings("Cardiomegaly: yes\nLung nodule: no\nEmphysema - present")
    assert explicit["Cardiomegaly"] == 1 and explicit["Lung nodule"] == 0 and explicit["Emphysema"] == 1
    assert parse_findings("Mediastinal lymph nodes are not enlarged.")["Lung nodule"] == 0
    after = parse_findings("Pleural effusion was not detected. Emphysema is not seen. Atelectasis is seen.")
    assert (after["Pleural effusion"], after["Emphysema"], after["Atelectasis"]) == (0, 0, 1)
    assert parse_yes_no("Yes, there is.") == 1 and parse_yes_no("No.") == 0 and parse_yes_no("maybe") is None


def test_parse_findings_report_like_text() -> None:
    report = ("Mediastinal main vascular structures, heart contour and size are normal. Calcified "
              "atherosclerotic plaques are observed in the aorta and coronary arteries. Pericardial "
              "effusion was not observed. No pathologically enlarged lymph nodes were detected. There are "
              "millimetric nonspecific nodules in both lungs. No pleural effusion or thickening. "
              "Cardiomegaly is not present.")
    positives = {name for name, value in parse_findings(report).items() if value}
    assert positives == {"Arterial wall calcification", "Coronary artery wall calcification", "Lung nodule"}
    assert parse_findings("Enlarged lymph nodes in the mediastinum.")["Lymphadenopathy"] == 1


def test_match_option_rules() -> None:
    assert match_option("B.", ["yes", "no"]) == 1  # letter
    assert match_option("The answer is (C)", ["a", "b", "c"]) == 2
    assert match_option("the answer is a tumor", ["cyst", "tumor"]) == 1  # lower-case 'a' is no letter
    assert match_option("Yes, there is a mass.", ["yes", "no"]) == 0  # option text
    assert match_option("There is no mass, not yes", ["yes", "no"]) == 1  # the first mentioned
    assert match_option("hypointense", ["hyperintense lesion", "hypodense", "normal"]) == 1  # closest


def test_closed_vqa_accuracy() -> None:
    result = closed_vqa_accuracy(["A", "no", "left lung"], [["yes", "no"], ["yes", "no"], ["left", "right"]],
                                 ["yes", 0, "left"])
    assert result == {"accuracy": pytest.approx(2 / 3), "n": 3, "correct": 2, "matched": [0, 1, 0]}
    with pytest.raises(MedicalDatasetError, match="not one of the options"):
        closed_vqa_accuracy(["A"], [["yes", "no"]], ["maybe"])


def test_parse_findings_checklist_round_trip() -> None:
    """The app asks for one '<name>: yes|no' line per abnormality; every pattern parses back exactly."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        truth = {name: int(v) for name, v in zip(CT_RATE_ABNORMALITIES, rng.integers(0, 2, 18))}
        text = "\n".join(f"- {name}: {'yes' if value else 'no'}" for name, value in truth.items())
        assert parse_findings(text) == truth
