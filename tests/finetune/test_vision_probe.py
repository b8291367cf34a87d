"""finetune.vision_probe: how well a vision stage's label head reads CT studies, satellite tiles and NIAH needles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune import FinetuneError
from finetune.vision_probe import (
    auc_or_none,
    centre_counts,
    finding_scores,
    head_side,
    main,
    needle_scores,
    object_scores,
)

LABELS = ["ct lung nodule", "ct cardiomegaly"]


def _truth(nodule: bool) -> dict:
    return {"Lung nodule": {"present": nodule}, "Cardiomegaly": {"present": False}}


def test_finding_scores_pool_image_probabilities_per_study() -> None:
    # three studies of three images; the nodule studies (0, 2) have it on one image each
    answers = [["none", "lung nodule (left)", "none"], ["none"] * 3, ["lung nodule (right)", "none", "none"]]
    truths = [_truth(True), _truth(False), _truth(True)]
    nodule = [[0.1, 0.9, 0.1], [0.6, 0.6, 0.6], [0.8, 0.0, 0.0]]  # study 1: many weak false positives
    probabilities = [np.stack([p, np.zeros(3)], axis=1) for p in map(np.asarray, nodule)]
    scores = finding_scores(answers, truths, probabilities, {label: i for i, label in enumerate(LABELS)})
    assert set(scores) == {"Lung nodule", "Cardiomegaly"}  # findings without a head label are left out
    got = scores["Lung nodule"]
    assert (got["studies_with"], got["images_with"]) == (2, 2)
    assert got["image_auc"] == pytest.approx(1.0)  # both positive images outscore all seven negatives
    assert got["study_auc_max"] == pytest.approx(1.0)  # 0.9, 0.8 > 0.6
    assert got["study_auc_mean"] == pytest.approx(0.0)  # 0.37, 0.27 < 0.6: the mean drowns one image
    assert scores["Cardiomegaly"]["study_auc_max"] is None  # no study has it: no AUC
    assert "study_auc_bag" not in got  # no bag probabilities given
    bags = [np.array([0.7, 0.1]), np.array([0.3, 0.1]), np.array([0.2, 0.1])]  # one pooled row per study
    with_bags = finding_scores(answers, truths, probabilities, {label: i for i, label in enumerate(LABELS)}, bags)
    assert with_bags["Lung nodule"]["study_auc_bag"] == pytest.approx(0.5)  # 0.7 > 0.3 > 0.2
    assert auc_or_none([True, False], [0.2, 0.4]) == pytest.approx(0.0)
    # cell level: every token's logit against whether the finding covers its cell
    token_logits = np.array([[2.0, 0.0], [0.5, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    covered = {"ct lung nodule": np.array([True, False, True, False]), "ct cardiomegaly": np.zeros(4, dtype=bool)}
    with_cells = finding_scores(answers, truths, probabilities, {label: i for i, label in enumerate(LABELS)},
                                cells=(token_logits, covered))
    assert with_cells["Lung nodule"]["cell_auc"] == pytest.approx(1.0)  # 2.0, 1.0 > 0.5, -1.0
    assert with_cells["Cardiomegaly"]["cell_auc"] is None and "cell_auc" not in got


def test_object_scores_read_tiles_counts_and_the_best_tile():
    labels = ["tile ships >= 1", "tile ships >= 2", "tile storage tanks >= 1"]  # no building labels
    index = {label: i for i, label in enumerate(labels)}
    # two scenes of three tiles; counts per tile: ships, storage tanks, buildings
    counts = [np.array([[0, 1, 0], [2, 0, 0], [0, 0, 4]]), np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]])]
    probabilities = [np.array([[0.2, 0.1, 0.9], [0.9, 0.7, 0.1], [0.6, 0.1, 0.2]]),   # a false ship on tile 3
                     np.array([[0.4, 0.0, 0.0], [0.3, 0.0, 0.0], [0.1, 0.0, 0.6]])]  # the ship read below 0.5
    scores = object_scores(counts, probabilities, index)
    assert set(scores) == {"ship", "storage tank"}  # buildings: no head label
    ships = scores["ship"]
    assert ships["tiles_with"] == 2
    assert ships["tile_auc"] == pytest.approx(0.875)  # 0.9 beats all four negatives, 0.4 all but the 0.6
    # tile counts read: scene 1 -> 0, 2, 1 (true 0, 2, 0), scene 2 -> 0, 0, 0 (true 1, 0, 0)
    assert ships["tile_count_accuracy"] == pytest.approx(4 / 6)
    assert ships["tile_count_accuracy_with"] == pytest.approx(1 / 2)  # the 2 right, the 1 read as 0
    assert ships["scene_count_accuracy"] == pytest.approx(0.0)  # 3 vs 2 and 0 vs 1
    assert ships["best_tile_accuracy"] == pytest.approx(1.0)  # tile 2 of scene 1, tile 1 of scene 2
    tanks = scores["storage tank"]
    assert tanks["best_tile_accuracy"] == pytest.approx(1.0) and tanks["scene_count_accuracy"] == pytest.approx(0.5)
    assert "cell_auc" not in ships
    logits = np.zeros((4, 3))
    logits[:, 0] = [3.0, -1.0, 2.0, 0.0]
    cells = (logits, {"tile ships >= 1": np.array([True, False, False, False])})
    assert object_scores(counts, probabilities, index, cells)["ship"]["cell_auc"] == pytest.approx(1.0)


def test_centre_counts_add_up_each_tile_s_centre_cells():
    labels = ["tile ships >= 1", "tile ships centres >= 1", "tile ships centres >= 2"]
    index = {label: i for i, label in enumerate(labels)}
    logits = np.full((2, 4, 3), -3.0)  # two tiles of four tokens
    logits[0, 1, 1] = logits[0, 3, 1] = logits[0, 3, 2] = 2.0  # tile 1: one centre, and two in another cell
    logits[1, 0, 2] = 1.0  # ">= 2" without ">= 1" still adds one: the levels are read as they stand
    assert centre_counts(logits, index, "ships").tolist() == [3, 1]
    assert centre_counts(logits, index, "buildings") is None
    counts = [np.array([[3, 0, 0], [0, 0, 0]])]
    probabilities = [np.array([[0.9, 0.9, 0.9], [0.2, 0.6, 0.6]])]
    ships = object_scores(counts, probabilities, index, token_logits=[logits])["ship"]
    assert ships["tile_count_accuracy_centres"] == pytest.approx(0.5)  # 3 right, 1 for 0 wrong
    assert ships["scene_count_accuracy_centres"] == pytest.approx(0.0)  # 4 for 3
    assert "tile_count_accuracy_centres" not in object_scores(counts, probabilities, index)["ship"]


def test_needle_scores_read_colour_and_shape_on_the_needle_images_only():
    labels = ["niah needle", "niah colour red", "niah colour blue", "niah shape square", "niah shape cross"]
    index = {label: i for i, label in enumerate(labels)}
    probabilities = np.array([[0.9, 0.8, 0.1, 0.3, 0.6],    # red cross: both right
                              [0.6, 0.7, 0.2, 0.9, 0.1],    # blue square: colour wrong
                              [0.7, 0.0, 0.9, 0.9, 0.9]])   # a haystack image, not scored for colour / shape
    scores = needle_scores(["red", "blue", None], ["cross", "square", None], probabilities, index)
    assert (scores["needles"], scores["haystacks"]) == (2, 1)
    assert scores["needle_auc"] == pytest.approx(0.5)  # 0.9 > 0.7 > 0.6
    assert scores["colour_accuracy"] == pytest.approx(0.5) and scores["shape_accuracy"] == pytest.approx(1.0)
    bare = needle_scores([None], [None], np.zeros((1, 1)), {"ct cardiomegaly": 0})
    assert bare == {"needles": 0, "haystacks": 1}


def test_side_accuracy_calls_each_study_side_from_the_left_and_right_labels() -> None:
    labels = ["ct lung nodule", "ct lung nodule left", "ct lung nodule right"]
    sides = ["left", "right", "both", None]  # the last study has no nodule: no side to call
    truths = [{"Lung nodule": {"present": side is not None, "side": side}} for side in sides]
    answers = [["none", "none"]] * 4
    # (images, labels): nodule, left, right; the side labels' maxima over the two images decide
    probabilities = [np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]]),   # left 0.8 > right 0.3: left (right call)
                     np.array([[0.9, 0.1, 0.2], [0.1, 0.6, 0.4]]),   # left 0.6 > right 0.4: left (wrong call)
                     np.array([[0.9, 0.7, 0.1], [0.1, 0.1, 0.5]]),   # both >= 0.5: both (right call)
                     np.array([[0.0, 0.9, 0.9], [0.0, 0.0, 0.0]])]   # not counted
    scores = finding_scores(answers, truths, probabilities, {label: i for i, label in enumerate(labels)})
    assert scores["Lung nodule"]["studies_with_side"] == 3
    assert scores["Lung nodule"]["side_accuracy"] == pytest.approx(2 / 3)
    assert (head_side(0.5, 0.5), head_side(0.2, 0.4), head_side(0.9, 0.49)) == ("both", "right", "left")


def test_vision_probe_cli_scores_a_vision_run_on_slab_renders(tmp_path, capsys) -> None:
    from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS
    from finetune.demo_data import build_heldout_subset
    from finetune.vision import save_head, vision_label_head
    from longllava.loading import load_model, save_random_model

    data, run = tmp_path / "data", tmp_path / "run"
    build_heldout_subset(data, n_ct=3, n_rs=1)
    save_random_model("tiny", run / "model", seed=0)
    model, _ = load_model(run / "model")
    labels = [f"ct {name.lower()}" for name in RENDERABLE_FINDINGS] + ["ct lung nodule left", "ct lung nodule right",
        "tile ships >= 1", "tile ships >= 2", "tile storage tanks >= 1", "tile buildings >= 1", "niah needle",
        "niah colour red", "niah colour green", "niah shape circle", "niah shape square"]
    save_head(vision_label_head(model, len(labels), seed=0), labels, run)
    render = "{num_slices: 4, size: 32, window: slab, tile_size: 336, max_tiles: 16}"
    assert main(["--run", str(run), "--data", str(data), "--render", render, "--cache-dir", str(tmp_path / "cache"),
                 "--limit", "3", "--needles", "6"]) == 0
    result = json.loads((run / "vision_probe.json").read_text())
    assert result["studies"] == 3 and result["render"]["window"] == "slab"
    studies = [json.loads(line)["ground_truth"]["findings"] for line in (data / "ct_test_studies.jsonl").open()]
    assert list(result["findings"]) == list(RENDERABLE_FINDINGS)
    for name, scores in result["findings"].items():
        assert scores["studies_with"] == sum(study[name]["present"] for study in studies)
        assert scores["images_with"] <= 4 * scores["studies_with"]  # only a study with it has such images
        for key in ("image_auc", "study_auc_max", "study_auc_mean", "study_auc_bag", "cell_auc"):
            assert scores[key] is None or 0.0 <= scores[key] <= 1.0
        if name == "Lung nodule":  # the one finding this head has side labels for
            sided = sum(study[name]["present"] and bool(study[name]["side"]) for study in studies)
            assert scores["studies_with_side"] == sided
            assert scores["side_accuracy"] is None if not sided else 0.0 <= scores["side_accuracy"] <= 1.0
        else:
            assert "side_accuracy" not in scores
    scene = json.loads((data / "rs_test_scenes.jsonl").read_text())["ground_truth"]
    assert result["scenes"]["scenes"] == 1
    assert result["scenes"]["tiles"] == scene["grid"]["rows"] * scene["grid"]["cols"]
    objects = result["scenes"]["objects"]
    for kind in ("ship", "storage tank", "building"):
        assert objects[kind]["tiles_with"] == len({tuple(o["tile"]) for o in scene["objects"] if o["kind"] == kind})
        assert 0.0 <= objects[kind]["tile_count_accuracy"] <= 1.0 and "cell_auc" in objects[kind]
    needles = result["needles"]
    assert (needles["needles"], needles["haystacks"]) == (6, 6)
    for key in ("needle_auc", "colour_accuracy", "shape_accuracy", "cell_auc"):
        assert 0.0 <= needles[key] <= 1.0
    table = capsys.readouterr().out
    assert "| objects | tiles with | tile AUC" in table and "6 needles and 6 haystack images" in table
    assert "| finding | studies with" in table and "study AUC (bag) | cell AUC | side acc. |" in table and "Cardiomegaly" in table
    with pytest.raises(FinetuneError, match="ct_test_studies.jsonl not found"):
        main(["--run", str(run), "--data", str(tmp_path / "nowhere")])
