"""finetune.tile_probe: does a model read a single tile's object counts?"""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune import FinetuneError
from finetune.tile_probe import main, parse_tile_answer, tile_scores

PLURALS = ["ships", "storage tanks", "buildings"]
KINDS = ["ship", "storage tank", "building"]


def test_parse_tile_answer_reads_each_kind_s_number() -> None:
    assert parse_tile_answer("ships 2, storage tanks 0, buildings 11", PLURALS) == [2, 0, 11]
    assert parse_tile_answer("storage tanks 3", PLURALS) == [None, 3, None]  # "tanks" is not "ships"
    assert parse_tile_answer("none", PLURALS) == [None, None, None]


def test_tile_scores_keep_empty_and_non_empty_tiles_apart() -> None:
    truth = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, 1]])
    # a model that answers "0, 0, 0" everywhere, but for the ship tile (off by one) and a false building
    read = [[0, 0, 0], [0, 0, 0], [0, 0, 1], [3, 0, 0], [0, 0, 0], [0, 0, None]]
    scores = tile_scores(truth, read, KINDS)
    assert scores["exact"] == pytest.approx(2 / 6) and scores["empty_exact"] == pytest.approx(2 / 3)
    assert (scores["non_empty_tiles"], scores["non_empty_exact"]) == (3, 0.0)
    assert scores["kinds"]["ship"] == {"tiles_with": 1, "exact": 0.0, "named": 1.0, "mean_abs_error": 1.0,
                                       "named_where_absent": 0}
    assert scores["kinds"]["storage tank"]["named"] == 0.0 and scores["kinds"]["storage tank"]["mean_abs_error"] == 3.0
    assert scores["kinds"]["building"]["named_where_absent"] == 1
    assert scores["kinds"]["building"]["mean_abs_error"] == 1.0  # a missing count reads as 0


def test_tile_probe_cli_on_a_tiny_model(tmp_path) -> None:
    from finetune.demo_data import build_heldout_subset
    from longllava.loading import save_random_model

    data, model = tmp_path / "data", tmp_path / "run" / "model"
    build_heldout_subset(data, n_ct=0, n_rs=1)
    save_random_model("tiny", model, seed=0)
    assert main(["--model", str(model), "--data", str(data), "--limit", "1", "--cache-dir", str(tmp_path / "c")]) == 0
    result = json.loads((tmp_path / "run" / "tile_probe.json").read_text())
    scene = json.loads((data / "rs_test_scenes.jsonl").read_text().splitlines()[0])["ground_truth"]
    assert result["tiles"] == len(result["answers"]) == scene["grid"]["rows"] * scene["grid"]["cols"]
    assert result["empty_tiles"] + result["non_empty_tiles"] == result["tiles"]
    assert sum(s["tiles_with"] for s in result["kinds"].values()) == len({tuple(o["tile"]) + (o["kind"],)
                                                                         for o in scene["objects"]})
    with pytest.raises(FinetuneError, match="rs_test_scenes.jsonl is missing"):
        main(["--model", str(model), "--data", str(tmp_path / "nowhere")])
