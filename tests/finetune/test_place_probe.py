"""finetune.place_probe: per layer, is the place of a scene's objects readable from the tiles / the answer?"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from domain_data.synthetic.satellite import OBJECT_KINDS
from finetune import FinetuneError
from finetune.place_probe import main, probe_accuracy, probe_auc, scene_places, tile_blocks


def test_tile_blocks_find_the_tiles_after_an_optional_thumbnail() -> None:
    assert tile_blocks(13 * 25, 25, (3, 4), "x") == 1  # thumbnail + 12 tiles
    assert tile_blocks(12 * 25, 25, (3, 4), "x") == 0
    with pytest.raises(FinetuneError, match="scene.tif: 275 image tokens are not 12 tiles"):
        tile_blocks(11 * 25, 25, (3, 4), "scene.tif")
    with pytest.raises(FinetuneError, match="not 12 tiles"):
        tile_blocks(13 * 25 + 3, 25, (3, 4), "x")


def test_scene_places_name_each_kind_s_tile() -> None:
    scene = {"ground_truth": {"grid": {"rows": 2, "cols": 3}, "objects": [
        {"kind": "ship", "tile": [2, 1]}, {"kind": "ship", "tile": [2, 1]}, {"kind": "building", "tile": [1, 3]}]}}
    assert scene_places(scene) == ((2, 3), {"ship": (2, 1), "building": (1, 3)})


def test_probes_score_a_separable_signal_and_report_the_majority() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([1, 2, 3] * 40)
    features = np.eye(3)[labels - 1] * 3 + rng.normal(0, 0.1, (120, 3))
    accuracy, majority = probe_accuracy(features[:90], labels[:90], features[90:], labels[90:])
    assert accuracy == 1.0 and majority == pytest.approx(1 / 3)
    noise = rng.normal(0, 1, (120, 3))
    assert probe_accuracy(noise[:90], labels[:90], noise[90:], labels[90:])[0] < 0.7
    assert probe_accuracy(features[:90], np.ones(90), features[90:], labels[90:]) == (None, pytest.approx(1 / 3))
    assert probe_auc(features[:90], labels[:90] == 2, features[90:], labels[90:] == 2) == 1.0
    assert probe_auc(features[:90], np.zeros(90, bool), features[90:], labels[90:] == 2) is None


def test_place_probe_cli_on_a_tiny_model(tmp_path, capsys) -> None:
    from finetune.demo_data import build_heldout_subset
    from longllava.loading import save_random_model

    data, model = tmp_path / "data", tmp_path / "run" / "model"
    build_heldout_subset(data, n_ct=0, n_rs=3)
    shutil.copy(data / "rs_test_scenes.jsonl", data / "rs_train_scenes.jsonl")  # the same scenes fit the probes
    save_random_model("tiny", model, seed=0)
    assert main(["--model", str(model), "--data", str(data), "--train", str(data), "--n-train", "3", "--limit", "3",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads((tmp_path / "run" / "place_probe.json").read_text())
    scenes = [json.loads(line)["ground_truth"] for line in (data / "rs_test_scenes.jsonl").read_text().splitlines()]
    assert result["n_test_tiles"] == sum(s["grid"]["rows"] * s["grid"]["cols"] for s in scenes)
    assert result["n_test_questions"] == sum(len({o["kind"] for o in s["objects"]}) for s in scenes) > 0
    config = json.loads((model / "config.json").read_text())
    assert len(result["layers"]) == config["text_config"]["num_hidden_layers"] + 1
    for layer in result["layers"]:
        for name in ("answer row", "tile row", "tile column", *(f"tile {kind}" for kind in OBJECT_KINDS)):
            assert layer[name] is None or 0.0 <= layer[name] <= 1.0, name
    assert "answer row" in capsys.readouterr().out
    with pytest.raises(FinetuneError, match="rs_test_scenes.jsonl is missing"):
        main(["--model", str(model), "--data", str(tmp_path / "nowhere"), "--train", str(data)])
