"""finetune.readout_probe: does a Yes/No answer depend on the finding asked, or only on the study?"""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune import FinetuneError
from finetune.readout_probe import finding_centred, main, readout_scores, relative_spread
from longllava.config import LongLlavaConfig

FINDINGS = ["Cardiomegaly", "Emphysema", "Lung nodule"]
TRUTH = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=bool)


def test_a_question_blind_readout_ties_every_within_study_pair() -> None:
    # one abnormality score per study plus a bias per finding: the failure of the demo card's items 6 and 8
    blind = np.array([2.0, 1.0, -3.0, 0.5])[:, None] + np.array([0.3, -0.2, -1.0])[None, :]
    assert np.all(finding_centred(blind) == finding_centred(blind)[:, :1])  # constant within a study
    scores = readout_scores(blind, TRUTH, FINDINGS)
    assert scores["within_study_auc"] == pytest.approx(0.5)  # all ties
    assert scores["studies_all_same_answer"] == 2  # studies 1 and 3 sit near 0, where the bias tips answers
    assert scores["findings"]["Cardiomegaly"] == {"present": 2, "answered_yes": 3, "study_auc": 0.75}


def test_a_readout_of_the_asked_finding_ranks_within_studies() -> None:
    reading = np.where(TRUTH, 2.0, -2.0) + np.array([5.0, -5.0, 0.0, 1.0])[:, None]  # plus a study offset
    scores = readout_scores(reading, TRUTH, FINDINGS)
    assert scores["within_study_auc"] == pytest.approx(1.0)
    assert scores["pooled_auc"] < 1.0  # the offsets mix studies up; the within-study pairs do not
    assert scores["findings"]["Emphysema"]["study_auc"] == pytest.approx(0.375)  # across studies, so are these
    assert scores["distinct_yes_patterns"] == 3


def test_relative_spread_per_layer() -> None:
    states = np.zeros((2, 2, 3))
    states[:, :, 0] = 2.0  # both layers: mean state (2, 0, 0)
    states[0, 1, 1], states[1, 1, 1] = 0.5, -0.5  # layer 1 varies across the two studies by +-0.5
    assert relative_spread(states) == pytest.approx([0.0, 0.25])


def test_readout_probe_cli_on_a_tiny_model(tmp_path, capsys) -> None:
    from finetune.demo_data import build_heldout_subset
    from longllava.loading import save_random_model

    data, model = tmp_path / "data", tmp_path / "run" / "model"
    build_heldout_subset(data, n_ct=2, n_rs=0)
    save_random_model("tiny", model, seed=0)
    assert main(["--model", str(model), "--data", str(data), "--limit", "2"]) == 0
    result = json.loads((tmp_path / "run" / "readout_probe.json").read_text())
    truth = [json.loads(line)["ground_truth"]["findings"] for line in (data / "ct_test_studies.jsonl").open()]
    assert result["studies"] == ["ct_test_0000", "ct_test_0001"]
    for row, study in zip(result["truth"], truth):
        assert row == [study[name]["present"] for name in result["findings_order"]]
    assert np.isfinite(np.asarray(result["margins"])).all() and len(result["margins"][0]) == 5
    spread = result["answer_state_spread"]  # embeddings + one per layer of the tiny preset
    assert len(spread) == 1 + LongLlavaConfig.from_preset("tiny").text_config.num_hidden_layers
    assert spread[0] < 1e-5 < max(spread)  # the same question token everywhere; the images reach later layers
    assert "within-study AUC" in capsys.readouterr().out
    with pytest.raises(FinetuneError, match="no CT presence questions"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "ct_test.jsonl").write_text("")
        main(["--model", str(model), "--data", str(tmp_path / "empty")])
