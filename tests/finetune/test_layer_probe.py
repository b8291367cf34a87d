"""finetune.layer_probe: per layer, is a finding linearly readable from the image tokens / the answer position?"""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune import FinetuneError
from finetune.layer_probe import PARTS, main, probe_aucs, writes_absent_rates
from longllava.config import LongLlavaConfig


def test_probe_aucs_reads_a_finding_carried_by_one_feature() -> None:
    rng = np.random.default_rng(0)
    train_y = np.array([[i % 2, 1] for i in range(40)], dtype=bool)  # column 1: one class only
    test_y = np.array([[i % 2, 1] for i in range(20)], dtype=bool)
    train_x, test_x = rng.normal(size=(40, 6)), rng.normal(size=(20, 6))
    train_x[:, 2] += 3.0 * train_y[:, 0]
    test_x[:, 2] += 3.0 * test_y[:, 0]
    aucs = probe_aucs(train_x, train_y, test_x, test_y)
    assert aucs[0] > 0.95 and aucs[1] is None
    shuffled = probe_aucs(train_x, train_y, rng.normal(size=(20, 6)), test_y)  # test features carry nothing
    assert shuffled[0] < 0.9


def test_layer_probe_cli_on_a_tiny_model(tmp_path, capsys) -> None:
    from domain_data.synthetic.build import build_synthetic_sets
    from finetune.demo_data import DEMO_BUILD, build_heldout_subset
    from longllava.loading import save_random_model

    train, data, model = tmp_path / "train", tmp_path / "data", tmp_path / "run" / "model"
    options = {k: v for k, v in DEMO_BUILD.items() if not k.startswith(("n_ct_", "n_rs_"))}
    build_synthetic_sets(train, n_ct_train=4, n_ct_test=0, n_rs_train=0, n_rs_test=0, **options)
    build_heldout_subset(data, n_ct=2, n_rs=0)
    save_random_model("tiny", model, seed=0)
    assert main(["--model", str(model), "--train", str(train), "--data", str(data), "--n-train", "4"]) == 0
    result = json.loads((tmp_path / "run" / "layer_probe.json").read_text())
    assert (result["n_train"], result["n_test"]) == (4, 2) and len(result["findings"]) == 5
    assert len(result["layers"]) == 1 + LongLlavaConfig.from_preset("tiny").text_config.num_hidden_layers
    for layer in result["layers"]:
        assert set(layer) == set(PARTS)
        assert all(v is None or 0.0 <= v <= 1.0 for part in layer.values() for v in part.values())
    # the embedding of the same question token in every study carries nothing: ties (0.5) or one class
    assert all(v in (None, 0.5) for v in result["layers"][0]["answer position"].values())
    assert "answer position" in capsys.readouterr().out
    with pytest.raises(FinetuneError, match="ct_train_studies.jsonl: missing"):
        main(["--model", str(model), "--train", str(tmp_path / "nowhere"), "--data", str(data)])


def test_report_prefix_stops_before_the_findings_sentence() -> None:
    from finetune.layer_probe import report_prefix

    text = ("Trachea and both main bronchi are in the midline and patent. No pleural effusion was detected. "
            "An area of consolidation is present in the right lung, on slices 62-84. No mass or nodule was detected.")
    study = {"id": "ct_x", "report": {"findings": text}}
    assert report_prefix(study, "Consolidation") == (
        "Findings: Trachea and both main bronchi are in the midline and patent. No pleural effusion was detected.")
    assert report_prefix(study, "Lung nodule").endswith("on slices 62-84.")
    with pytest.raises(FinetuneError, match="no sentence for its absence"):
        report_prefix(study, "Emphysema")
    with pytest.raises(FinetuneError, match="ct_x: its report has no sentence with 'heart'"):
        report_prefix(study, "Cardiomegaly")


def test_writes_absent_rates_split_the_greedy_choice_by_truth() -> None:
    truth = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    writes_absent = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert writes_absent_rates(truth, writes_absent) == {"with the finding": 0.75, "without it": 0.5}
    assert writes_absent_rates(np.zeros(2, dtype=bool), np.array([1.0, 1.0])) == {
        "with the finding": None, "without it": 1.0}


def test_layer_probe_teacher_forces_the_report_up_to_a_finding(tmp_path) -> None:
    from domain_data.synthetic.build import build_synthetic_sets
    from finetune.demo_data import DEMO_BUILD, build_heldout_subset
    from longllava.loading import save_random_model

    train, data, model = tmp_path / "train", tmp_path / "data", tmp_path / "run" / "model"
    options = {k: v for k, v in DEMO_BUILD.items() if not k.startswith(("n_ct_", "n_rs_"))}
    build_synthetic_sets(train, n_ct_train=4, n_ct_test=0, n_rs_train=0, n_rs_test=0, **options)
    build_heldout_subset(data, n_ct=2, n_rs=0)
    save_random_model("tiny", model, seed=0)
    out = tmp_path / "probe"
    assert main(["--model", str(model), "--train", str(train), "--data", str(data), "--n-train", "4",
                 "--report-finding", "Consolidation", "--out", str(out)]) == 0
    result = json.loads((out / "layer_probe.json").read_text())
    assert result["question"] == "Write the findings and impressions of this chest CT."
    assert result["absent_sentence"] == "No consolidation was observed"
    readout = result["model_readout_auc"]
    assert readout is None or 0.0 <= readout <= 1.0
    rates = result["model_writes_absent"]
    assert set(rates) == {"with the finding", "without it"}
    assert all(rate is None or 0.0 <= rate <= 1.0 for rate in rates.values())
    assert len(result["layers"]) == 1 + LongLlavaConfig.from_preset("tiny").text_config.num_hidden_layers
    prompts = [json.loads(line) for line in (out / "layer_probe_work" / "test_questions.jsonl").open()]
    assert all(p["conversations"][0]["value"].endswith(result["question"]) for p in prompts)
