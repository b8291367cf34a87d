"""The bundled demo model: its recipe trains, the committed checkpoint is what the recipe describes, and
``longllava evaluate --model demo`` on a small held-out subset reproduces the model card's predictions."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune.demo_data import (
    COUNTS_FILE,
    DEMO_BUILD,
    DEMO_RENDER,
    DEMO_TOKEN_GRID,
    NEEDLE_ANSWERS_FILE,
    NEEDLE_QUESTION,
    PLACES_FILE,
    REPORTS_FILE,
    SCENE_LOCATION_PREFIXES,
    SLICE_QUESTION,
    TILE_COUNTS_FILE,
    TILE_QUESTION,
    TILES_WITH_OBJECTS_FILE,
    VISION_TILE_SCENES_FILE,
    VISION_TILE_SEED_BASE,
    VISION_TILES_FILE,
    VISION_TILES_REPLAY_FILE,
    DemoDataError,
    add_ct_token_labels,
    add_scene_token_labels,
    build_heldout_subset,
    build_niah_train,
    count_only_version,
    ct_token_label_names,
    follow_up_conversations,
    location_only_version,
    needle_token_label_names,
    needle_token_labels,
    polish_records,
    presence_only_version,
    question_order_group,
    rendered_slice_answers,
    report_only_version,
    shuffled_conversations,
    shuffled_records,
    single_image_records,
    slab_token_labels,
    slice_findings_answer,
    split_per_question,
    study_bag_records,
    tile_centre_label_names,
    tile_centre_labels,
    tile_count_version,
    tile_counts_answer,
    tile_object_counts,
    tile_replay_records,
    tile_token_label_names,
    tile_token_labels,
    tiles_with_objects_records,
    vision_needle_records,
    vision_records,
    vision_tile_records,
    write_count_records,
    write_polish_records,
    write_report_records,
    write_shuffled_records,
    write_single_image_records,
    write_tile_count_records,
)
from finetune.demo_scores import CARD_ROWS, card_tables, earlier_stages, evaluation_plan
from finetune.evaluate import METRICS, read_predictions
from finetune.train import INFERENCE_DEFAULTS_FILE, Recipe, load_recipe
from longllava.config import LongLlavaConfig
from longllava.loading import DEMO_DIR, load_model, resolve_model_dir

SCORES_FILE = DEMO_DIR / "eval_scores.json"
MAX_CHECKPOINT_BYTES = 50 * 1024 * 1024
# Text-model fields that follow the tokenizer (build_model sizes the vocabulary to it), not the preset.
TOKENIZER_FIELDS = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"}
STORAGE_FIELDS = {"dtype", "use_cache"}  # saved by the run (weight dtype; training turns the cache off), not shape


@pytest.fixture(scope="module")
def scores() -> dict:
    return json.loads(SCORES_FILE.read_text())


def test_demo_resolves_to_the_bundled_folder_with_its_card():
    assert resolve_model_dir("demo") == DEMO_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 INFERENCE_DEFAULTS_FILE, "MODEL_CARD.md", "eval_scores.json", "training_recipe.yaml"):
        assert (DEMO_DIR / name).is_file(), name
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= MAX_CHECKPOINT_BYTES
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert "synthetic" in card.lower() and "python -m finetune.demo_data" in card and "longllava finetune demo" in card


def test_committed_checkpoint_matches_the_recipes():
    """Five stages: demo_vision from the seeded preset, demo_vision_tiles (1b) from its model, demo_warmup
    from that with its projector seeded from 1b's head, demo from that, demo_polish from that."""
    names = ("demo_vision", "demo_vision_tiles", "demo_warmup", "demo", "demo_polish")
    first, tiles, warmup, whole, recipe = stages = [load_recipe(name) for name in names]
    assert first.base_model.startswith("preset:") and all(stage.mode == "full" for stage in stages)
    assert [stage.stage for stage in stages] == ["vision", "vision", "sft", "sft", "sft"]
    assert not any(stage.train_vision_tower for stage in (warmup, whole, recipe))
    assert all(later.base_model == f"{earlier.output_dir}/model" for earlier, later in zip(stages, stages[1:]))
    assert warmup.projector_init_head == tiles.output_dir  # stage 1b's head
    assert not whole.projector_init_head and not recipe.projector_init_head
    assert whole.grid_places == 8 and not recipe.grid_places  # stage 3 adds them, the polish keeps them
    assert all(stage.render == DEMO_RENDER for stage in stages)
    assert warmup.image_cache_dir == whole.image_cache_dir == recipe.image_cache_dir  # one render cache
    preset = LongLlavaConfig.from_preset(first.base_model.split(":", 1)[1])
    saved = LongLlavaConfig.from_pretrained(DEMO_DIR)
    assert saved.pooled_grid == preset.pooled_grid and saved.grid_places == whole.grid_places
    saved_vision = {k: v for k, v in saved.vision_config.to_dict().items() if k not in STORAGE_FIELDS}
    assert saved_vision == {k: v for k, v in preset.vision_config.to_dict().items() if k not in STORAGE_FIELDS}
    ignored = TOKENIZER_FIELDS | STORAGE_FIELDS
    saved_text = {k: v for k, v in saved.text_config.to_dict().items() if k not in ignored}
    preset_text = {k: v for k, v in preset.text_config.to_dict().items() if k not in ignored}
    assert saved_text == preset_text
    # the recipes that trained the checkpoint (copied from the runs) are the bundled ones, key for key
    defaults = asdict(Recipe())
    files = [f"stage{number}_recipe.yaml" for number in range(1, 5)] + ["training_recipe.yaml"]
    for stage, file in zip(stages, files):
        ran = yaml.safe_load((DEMO_DIR / file).read_text())
        # a key added to Recipe after a stage ran must hold its default (the run behaved as it says)
        assert {**{k: defaults[k] for k in asdict(stage).keys() - ran.keys()}, **ran} == asdict(stage), file
    defaults = json.loads((DEMO_DIR / INFERENCE_DEFAULTS_FILE).read_text())
    assert defaults == {"render": recipe.render}


def test_bundled_model_loads_every_weight_in_fp32():
    model, processor = load_model("demo")
    assert next(model.parameters()).dtype.is_floating_point
    assert processor.tokens_per_image == model.config.tokens_per_image == 25
    assert model.config.image_size == 160


def _tiny_build(root: Path) -> Path:
    from domain_data.synthetic.build import build_synthetic_sets

    options = {k: v for k, v in DEMO_BUILD.items() if k not in ("n_ct_test", "n_rs_test", "n_ct_train", "n_rs_train")}
    build_synthetic_sets(root, n_ct_train=2, n_ct_test=0, n_rs_train=1, n_rs_test=0, **options)
    build_niah_train(root, n_records=3, pool_size=8, images_range=(3, 4))
    return root


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    return _tiny_build(tmp_path_factory.mktemp("demo_data"))


def _conversation(*turns: str, tag: bool = True) -> dict:
    values = [f"<image>\n{turns[0]}" if tag else turns[0], *turns[1:]]
    return {"id": "s1", "image": "ct/a.nii.gz", "layout": "series",
            "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]}


def _pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    return [(turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def test_split_per_question_gives_every_question_its_own_record_after_the_images():
    record = _conversation("Nodule? Answer Yes or No.", "Yes", "How many nodules?", "2", "Side?", "left")
    pieces = split_per_question(record)
    assert [p["id"] for p in pieces] == ["s1_q00", "s1_q01", "s1_q02"]
    assert [p["conversations"][0]["value"] for p in pieces] == [
        "<image>\nNodule? Answer Yes or No.", "<image>\nHow many nodules?", "<image>\nSide?"]
    assert [p["conversations"][1]["value"] for p in pieces] == ["Yes", "2", "left"]
    assert all(p["image"] == "ct/a.nii.gz" and p["layout"] == "series" for p in pieces)
    assert record["conversations"][2]["value"] == "How many nodules?"  # the source is not modified
    # records without an image tag (``images`` layout: the protocol places the tags) get none
    untagged = split_per_question(_conversation("Which colour?", "red square", tag=False))
    assert untagged[0]["conversations"][0]["value"] == "Which colour?"


def test_shuffled_conversations_keep_every_pair_in_seeded_orders_with_the_tag_first():
    record = _conversation(*[x for k in range(6) for x in (f"q{k}?", f"a{k}")])
    copies = shuffled_conversations(record, index=0, copies=3, seed=0)
    assert [c["id"] for c in copies] == ["s1_c00", "s1_c01", "s1_c02"]
    for copy in copies:
        assert sorted(_pairs(copy)) == sorted(_pairs(record))  # every question keeps its own answer
        values = [t["value"] for t in copy["conversations"][::2]]
        assert values[0].startswith("<image>\n") and not any("<image>" in v for v in values[1:])
        assert copy["image"] == record["image"] and copy["layout"] == "series"
    orders = [[q for q, _ in _pairs(c)] for c in copies]
    assert len({tuple(o) for o in orders}) == 3  # 6! orders: three copies differ
    assert shuffled_conversations(record, 0, 3, 0) == copies and shuffled_conversations(record, 1, 3, 0) != copies
    records = [dict(record, id=f"s{k}") for k in range(10)]
    mixed = shuffled_records(records, copies=2, seed=0)
    assert sorted(r["id"] for r in mixed) == sorted(f"s{k}_c0{j}" for k in range(10) for j in (0, 1))
    assert [r["id"] for r in mixed] != sorted(r["id"] for r in mixed) and mixed == shuffled_records(records, 2, 0)


def test_no_shuffled_question_follows_one_that_gives_its_answer_away():
    """Side / slices / row / column / tile questions exist only for what is there, and the report states
    every answer: both come after the presence and count questions they would answer."""
    from domain_data.synthetic.ct_phantom import make_ct_phantom
    from domain_data.synthetic.qa import (
        RENDERABLE_FINDINGS,
        ct_questions,
        ct_report_question,
        llava_record,
        scene_questions,
    )
    from domain_data.synthetic.satellite import make_scene

    phantom = make_ct_phantom(3, findings=list(RENDERABLE_FINDINGS), n_slices=40, size=96)
    scene = make_scene(5, 672, 672, objects={"ship": 2, "storage tank": 1, "building": 0}, tile_size=336)
    ct_items = [*ct_questions(phantom), ct_report_question(phantom)]
    expected = {"presence": 0, "count": 0, "side": 1, "slices": 1, "row": 1, "column": 1, "tile": 1, "report": 2}
    items = ct_items + scene_questions(scene)
    assert {item["kind"] for item in items} == set(expected)  # every kind of question is checked
    for item in items:
        assert question_order_group(item["question"], item["answer"]) == expected[item["kind"]], item
    record = llava_record("ct_0", "ct_0.nii.gz", "series", ct_items)
    kinds = {item["question"]: item["kind"] for item in ct_items}
    orders = []
    for copy in shuffled_conversations(record, index=0, copies=3, seed=0):
        asked = [q.removeprefix("<image>\n") for q, _ in _pairs(copy)]
        groups = [expected[kinds[q]] for q in asked]
        assert groups == sorted(groups) and len(asked) == len(ct_items)
        orders.append(tuple(asked))
    assert len(set(orders)) == 3  # still shuffled within the groups


def test_follow_up_copies_put_side_slices_report_and_tiles_straight_after_the_images():
    """The follow-up copy asks only what the shuffled copies keep behind presence and counts, so each of
    those questions can come first after the images, and still no presence answer can be read off."""
    from domain_data.synthetic.ct_phantom import make_ct_phantom
    from domain_data.synthetic.qa import RENDERABLE_FINDINGS, ct_questions, ct_report_question, llava_record

    phantom = make_ct_phantom(3, findings=list(RENDERABLE_FINDINGS), n_slices=40, size=96)
    items = [*ct_questions(phantom), ct_report_question(phantom)]
    record = llava_record("ct_0", "ct_0.nii.gz", "series", items)
    follow_ups = {(i["question"], i["answer"]) for i in items if i["kind"] in ("side", "slices", "report")}
    assert len(follow_ups) >= 5
    firsts = set()
    for index in range(40):
        (copy,) = follow_up_conversations(record, index, copies=1, seed=0)
        pairs = _pairs(copy)
        assert copy["id"] == "ct_0_f00" and set(pairs) == follow_ups and len(pairs) == len(follow_ups)
        assert copy["conversations"][0]["value"].startswith("<image>\n")
        firsts.add(pairs[0][0])
    assert len(firsts) >= 3  # the report and several side / slice questions each come first somewhere
    assert any(q.startswith("Write the findings") for q in firsts)
    assert follow_up_conversations(record, 0, 1, 0) == follow_up_conversations(record, 0, 1, 0)
    # presence-only conversations have nothing to follow up; the mixed file holds both kinds of copy
    plain = _conversation("Nodule? Answer Yes or No.", "No")
    assert follow_up_conversations(plain, 0, copies=1, seed=0) == []
    mixed = shuffled_records([record, plain], copies=2, seed=0, follow_up_copies=1)
    assert sorted(r["id"] for r in mixed) == ["ct_0_c00", "ct_0_c01", "ct_0_f00", "s1_c00", "s1_c01"]


def test_report_only_versions_ask_the_report_straight_after_the_images(tmp_path):
    record = dict(_conversation("Nodule? Answer Yes or No.", "Yes", "Write the findings and impressions.",
                                "Findings: A 12 mm nodule.\nImpressions: 1 lung nodule (right)."), id="ct_train_0003")
    report = report_only_version(record)
    assert report == {"id": "ct_train_0003_rf", "image": "ct/a.nii.gz", "layout": "series", "conversations": [
        {"from": "human", "value": "<image>\nWrite the findings and impressions."},
        {"from": "gpt", "value": "Findings: A 12 mm nodule.\nImpressions: 1 lung nodule (right)."}]}
    assert report_only_version(_conversation("Nodule? Answer Yes or No.", "No")) is None
    # the file: every second study's report (studies 0 and 2 here), a study without one left out
    studies = [dict(record, id=f"ct_train_{k:04d}") for k in range(4)]
    studies[2] = dict(_conversation("Nodule? Answer Yes or No.", "No"), id="ct_train_0002")
    (tmp_path / "ct_train.json").write_text(json.dumps(studies))
    assert [r["id"] for r in json.loads(write_report_records(tmp_path).read_text())] == ["ct_train_0000_rf"]
    assert [r["id"] for r in json.loads(write_report_records(tmp_path, every=1).read_text())] == [
        "ct_train_0000_rf", "ct_train_0001_rf", "ct_train_0003_rf"]
    with pytest.raises(DemoDataError, match="every must be >= 1"):
        write_report_records(tmp_path, every=0)


def test_presence_only_versions_keep_the_yes_no_turns_and_the_polish_replays_the_rest():
    record = _conversation("How many nodules?", "2", "Nodule? Answer Yes or No.", "Yes",
                           "Effusion? Answer Yes or No.", "No", "Write the findings.", "Findings: ...")
    record["id"] = "s1_c00"
    presence = presence_only_version(record)
    assert presence["id"] == "s1_c00_p" and presence["image"] == record["image"]
    assert [t["value"] for t in presence["conversations"]] == [
        "<image>\nNodule? Answer Yes or No.", "Yes", "Effusion? Answer Yes or No.", "No"]
    assert presence_only_version(_conversation("How many nodules?", "2")) is None
    second, third = dict(record, id="s1_c01"), dict(record, id="s1_c02")
    scenes = [dict(_conversation("How many ships?", "3"), id=f"r1_c0{k}") for k in (2, 0)]
    niah = [dict(_conversation("Which colour?", "red", tag=False), id=f"n{k}") for k in range(3)]
    polish = polish_records([third, record, second], scenes, niah, presence_copies=2, ct_replay_versions=2,
                            rs_replay_versions=2, niah_records=2)
    assert [r["id"] for r in polish] == ["s1_c02_p", "s1_c00_p", "s1_c01_p"] * 2 + [
        "s1_c00", "s1_c01", "r1_c00", "n0", "n1"]
    assert [r["id"] for r in polish_records([record], scenes, niah, 1, 1, 1, 0)] == ["s1_c00_p", "s1_c00", "r1_c00"]
    # follow-up versions go after each domain's replay
    study_follow_up, scene_follow_up = dict(record, id="s1_f00"), dict(scenes[0], id="r1_f00")
    with_follow_ups = polish_records([record, second], scenes, niah, 1, 1, 0, 1, ct_follow_ups=[study_follow_up],
                                     rs_follow_ups=[scene_follow_up])
    assert [r["id"] for r in with_follow_ups] == ["s1_c00_p", "s1_c01_p", "s1_c00", "s1_f00", "r1_f00", "n0"]
    # count-only versions of the scenes' first shuffled versions go last, count_copies times
    scene = dict(_conversation("How many ships are there in the image? Answer with a number.", "3",
                               "Is there a ship in the image? Answer Yes or No.", "Yes",
                               "Which row of tiles (1 = top) contains ships? Answer with the row number(s).", "2",
                               "Count the storage tanks in this image. Answer with a number.", "0"), id="r2_c00")
    counts = count_only_version(scene)
    assert counts["id"] == "r2_c00_n" and [t["value"] for t in counts["conversations"]] == [
        "<image>\nHow many ships are there in the image? Answer with a number.", "3",
        "Count the storage tanks in this image. Answer with a number.", "0"]
    assert count_only_version(_conversation("Is there a ship in the image? Answer Yes or No.", "No")) is None
    with_counts = polish_records([record], [scene, dict(scene, id="r2_c01")], niah, 1, 1, 0, 0, count_versions=1,
                                 count_copies=2)
    assert [r["id"] for r in with_counts] == ["s1_c00_p", "s1_c00", "r2_c00_n", "r2_c00_n"]
    # location-only versions (row, column, tile turns) go after them, location_copies times
    located = dict(_conversation("Which tile contains ships? Answer as row R, column C.", "row 2, column 1",
                                 "Count the ships in this image. Answer with a number.", "3",
                                 "Which row of tiles (1 = top) contains ships? Answer with the row number(s).", "2",
                                 "Which column of tiles (1 = left) contains ships? Answer with the column number(s).",
                                 "1"), id="r3_c00")
    places = location_only_version(located)
    assert places["id"] == "r3_c00_l" and [t["value"] for t in places["conversations"]] == [
        "<image>\nWhich tile contains ships? Answer as row R, column C.", "row 2, column 1",
        "Which row of tiles (1 = top) contains ships? Answer with the row number(s).", "2",
        "Which column of tiles (1 = left) contains ships? Answer with the column number(s).", "1"]
    assert location_only_version(_conversation("Count the ships in this image. Answer with a number.", "0")) is None
    with_places = polish_records([record], [located, dict(located, id="r3_c01"), dict(located, id="r3_c02")], niah,
                                 1, 1, 0, 0, count_versions=1, count_copies=1, location_versions=2,
                                 location_copies=2)
    assert [r["id"] for r in with_places] == ["s1_c00_p", "s1_c00", "r3_c00_n", "r3_c00_l", "r3_c01_l",
                                              "r3_c00_l", "r3_c01_l"]


def test_count_records_ask_each_scenes_counts_alone_for_its_first_versions(tmp_path):
    counts = ("How many ships are there in the image? Answer with a number.", "3",
              "Count the storage tanks in this image. Answer with a number.", "0")
    scenes = [dict(_conversation(*counts, "Is there a ship in the image? Answer Yes or No.", "Yes"), id=f"r{k}_c{v:02d}")
              for k in range(2) for v in range(3)]
    scenes.append(dict(_conversation("Is there a ship in the image? Answer Yes or No.", "No"), id="r2_c00"))
    (tmp_path / "rs_train_shuffled.json").write_text(json.dumps(scenes))
    written = json.loads(write_count_records(tmp_path, versions=2).read_text())
    # file order, the first two versions of each scene, a scene without count turns left out
    assert [r["id"] for r in written] == ["r0_c00_n", "r0_c01_n", "r1_c00_n", "r1_c01_n"]
    assert _pairs(written[0]) == [(counts[0], "3"), (counts[2], "0")]
    assert written[0]["conversations"][0]["value"].startswith("<image>\n")
    assert len(json.loads(write_count_records(tmp_path).read_text())) == 6  # default: 3 versions
    with pytest.raises(DemoDataError, match="versions must be >= 1"):
        write_count_records(tmp_path, versions=0)


def test_tile_count_records_ask_each_tiles_counts_as_the_scene_questions(tmp_path):
    tile = {"id": "r0_t12_x0", "images": ["cache/00003.png"], "layout": "images",
            "conversations": [{"from": "human", "value": TILE_QUESTION},
                              {"from": "gpt", "value": "ships 0, storage tanks 3, buildings 1"}]}
    version = tile_count_version(tile, np.random.default_rng(0))
    assert version["id"] == "r0_t12_x0_n" and version["images"] == tile["images"] and version["layout"] == "images"
    answers = dict(_pairs(version))
    # one turn per kind, each worded as a scene's count question, answered with the tile's count
    wordings = {f"How many {plural} are there in the image? Answer with a number.": plural for plural in
                ("ships", "storage tanks", "buildings")}
    wordings |= {f"Count the {plural} in this image. Answer with a number.": plural for plural in wordings.values()}
    assert {wordings[question]: answer for question, answer in answers.items()} == {
        "ships": "0", "storage tanks": "3", "buildings": "1"}
    orders = {tuple(wordings[q] for q, _ in _pairs(tile_count_version(tile, np.random.default_rng(k))))
              for k in range(20)}
    assert len(orders) > 1  # the order is drawn, not fixed
    with pytest.raises(DemoDataError, match="not a tile record"):
        tile_count_version(dict(tile, conversations=_conversation("q", "a")["conversations"]), np.random.default_rng(0))
    (tmp_path / TILES_WITH_OBJECTS_FILE).write_text(json.dumps([tile, dict(tile, id="r1_t11_x0")]))
    written = json.loads(write_tile_count_records(tmp_path).read_text())
    assert [r["id"] for r in written] == ["r0_t12_x0_n", "r1_t11_x0_n"]
    assert written == json.loads(write_tile_count_records(tmp_path).read_text())  # seeded
    twice = json.loads(write_tile_count_records(tmp_path, copies=2).read_text())
    assert twice[:2] == written and [r["id"] for r in twice[2:]] == ["r0_t12_x0_n1", "r1_t11_x0_n1"]
    with pytest.raises(DemoDataError, match="copies must be >= 1"):
        write_tile_count_records(tmp_path, copies=0)


def test_split_per_question_rejects_broken_conversations(tmp_path):
    broken = _conversation("q", "a")
    broken["conversations"].append({"from": "human", "value": "dangling"})
    with pytest.raises(DemoDataError, match="alternate human/gpt"):
        split_per_question(broken)
    with pytest.raises(DemoDataError, match="ct_train.json.*python -m finetune.demo_data"):
        write_shuffled_records(tmp_path)


def test_slice_findings_answer_follows_the_ground_truth_spans_and_nodules():
    findings = {
        "Lung nodule": {"present": True, "side": "both", "slices": [10, 40],
                        "details": {"nodules": [{"side": "left", "slices": [10, 14]},
                                                {"side": "right", "slices": [36, 40]}]}},
        "Cardiomegaly": {"present": True, "side": None, "slices": [12, 60], "details": {}},
        "Emphysema": {"present": False, "side": None, "slices": None, "details": {}},
    }
    assert slice_findings_answer(findings, 11.6) == "lung nodule (left), cardiomegaly"  # plane 12
    assert slice_findings_answer(findings, 25.0) == "cardiomegaly"  # between the two nodules
    assert slice_findings_answer(findings, 40.4) == "lung nodule (right), cardiomegaly"  # plane 40
    assert slice_findings_answer(findings, 61.0) == "none"
    assert slice_findings_answer(findings, 15.0, 35) == "cardiomegaly"  # a slab between the nodules
    assert slice_findings_answer(findings, 14.0, 36) == "lung nodule (both), cardiomegaly"  # touches both
    truth = {"shape_zyx": [64, 8, 8], "findings": findings}
    # 4 sampled planes 0, 21, 42, 63; 4 slabs 0-15, 16-31, 32-47, 48-63
    assert rendered_slice_answers(truth, {**DEMO_RENDER, "window": "multi"}, 4) == [
        "none", "cardiomegaly", "cardiomegaly", "none"]
    assert rendered_slice_answers(truth, DEMO_RENDER, 4) == [
        "lung nodule (left), cardiomegaly", "cardiomegaly", "lung nodule (right), cardiomegaly", "cardiomegaly"]
    findings["Lung nodule"]["details"]["nodules"][1]["slices"] = [12, 16]
    assert slice_findings_answer(findings, 13.0).startswith("lung nodule (both)")


def test_tile_counts_answer_counts_the_objects_of_one_tile():
    objects = [{"kind": "ship", "tile": [1, 2]}, {"kind": "ship", "tile": [1, 2]},
               {"kind": "building", "tile": [2, 1]}, {"kind": "storage tank", "tile": [1, 2]}]
    assert tile_counts_answer(objects, 1, 2) == "ships 2, storage tanks 1, buildings 0"
    assert tile_counts_answer(objects, 2, 1) == "ships 0, storage tanks 0, buildings 1"
    assert tile_counts_answer(objects, 2, 2) == "ships 0, storage tanks 0, buildings 0"


def test_single_image_records_label_every_slice_tile_and_needle(tiny_build, tmp_path):
    records = single_image_records(tiny_build, tmp_path / "cache")
    assert records == single_image_records(tiny_build, tmp_path / "cache")  # seeded
    by_kind = {kind: [r for r in records if r["id"].startswith(kind)] for kind in ("ct", "rs", "niah")}
    assert len(by_kind["ct"]) == 2 * DEMO_RENDER["num_slices"]
    assert all(r["conversations"][-2]["value"] == SLICE_QUESTION for r in by_kind["ct"])  # the listing last
    scene = json.loads((tiny_build / "rs_train_scenes.jsonl").read_text().splitlines()[0])["ground_truth"]
    assert len(by_kind["rs"]) == scene["grid"]["rows"] * scene["grid"]["cols"]
    totals = dict.fromkeys(scene["counts"], 0)
    for record in by_kind["rs"]:
        assert record["conversations"][0]["value"] == TILE_QUESTION
        for part in record["conversations"][1]["value"].split(", "):
            name, count = part.rsplit(" ", 1)
            totals[{"ships": "ship", "storage tanks": "storage tank", "buildings": "building"}[name]] += int(count)
    assert totals == scene["counts"]  # every object lies in exactly one tile
    niah = json.loads((tiny_build / "niah_train.json").read_text())
    needles = [r for r in by_kind["niah"] if r["conversations"][1]["value"] != "none"]
    assert sorted(r["conversations"][1]["value"] for r in needles) == sorted(r["conversations"][1]["value"] for r in niah)
    assert all("needle_" in r["images"][0] and r["conversations"][0]["value"] == NEEDLE_QUESTION for r in needles)
    assert all("hay_" in r["images"][0] for r in by_kind["niah"] if r not in needles)
    assert all(Path(r["images"][0]).is_absolute() and Path(r["images"][0]).is_file() for r in records)


def test_slab_presence_turns_ask_every_finding_and_agree_with_the_listing(tiny_build, tmp_path):
    from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS

    plain = single_image_records(tiny_build, tmp_path / "cache", slab_presence=False)
    asked = single_image_records(tiny_build, tmp_path / "cache", slab_presence=True)
    assert asked == single_image_records(tiny_build, tmp_path / "cache", slab_presence=True)  # seeded
    assert [r["id"] for r in plain] == [r["id"] for r in asked]
    assert vision_records(plain) == vision_records(asked)  # stage 1 sees the same labels either way
    ct = [(p, a) for p, a in zip(plain, asked, strict=True) if p["id"].startswith("ct")]
    orders, answers = set(), []
    for before, after in ct:
        turns = after["conversations"]
        assert len(turns) == 12 and turns[-2:] == before["conversations"]
        listing = turns[-1]["value"]
        named = []
        for question, answer in zip(turns[0:10:2], turns[1:10:2], strict=True):
            name = next(n for n in RENDERABLE_FINDINGS if n.lower().split()[-1] in question["value"].lower())
            named.append(name)
            assert answer["value"] == ("Yes" if name.lower() in listing else "No"), (after["id"], question)
            answers.append(answer["value"])
        assert sorted(named) == sorted(RENDERABLE_FINDINGS)
        orders.add(tuple(named))
    assert len(orders) > 1 and {"Yes", "No"} <= set(answers)  # shuffled per image; both answers occur
    assert all(p == a for p, a in zip(plain, asked, strict=True) if not p["id"].startswith("ct"))


def test_vision_needles_are_balanced_new_images_labelled_for_stage_1_and_answered_in_words(tiny_build, tmp_path):
    from PIL import Image

    from domain_data.synthetic.niah import NEEDLE_COLOURS, NEEDLE_SHAPES

    pairs = [f"{c} {s}" for c in NEEDLE_COLOURS for s in NEEDLE_SHAPES]
    needles = vision_needle_records(tiny_build, 2 * len(pairs))
    assert needles == vision_needle_records(tiny_build, 2 * len(pairs))  # seeded
    answers = [r["conversations"][1]["value"] for r in needles]
    assert sorted(answers) == sorted(pairs * 2) and answers[:len(pairs)] != pairs  # balanced, shuffled
    assert all(r["conversations"][0]["value"] == NEEDLE_QUESTION for r in needles)
    pixels = [np.asarray(Image.open(r["images"][0])) for r in needles]
    training = [np.asarray(Image.open(path)) for path in sorted((tiny_build / "niah_train").glob("*.png"))]
    assert not any(np.array_equal(a, b) for a in pixels for b in training)  # no pool or record image again
    single = write_single_image_records(tiny_build, tmp_path / "cache", vision_needles=8, vision_tile_scenes=2,
                                        tile_copies=2, tile_replay=5)
    stage2 = json.loads(single.read_text())
    stage1 = json.loads((tiny_build / "vision_train.json").read_text())
    assert len(stage1) == len(stage2) + 8 and not any("niah_vision" in r["id"] for r in stage2)
    extra = [r for r in stage1 if r["id"].startswith("niah_vision")]
    assert sorted(r["id"] for r in extra) == [f"niah_vision_{k:05d}" for k in range(8)]
    assert all(r["labels"][0] == "niah needle" and len(r["labels"]) == 3 for r in extra)
    assert stage1.index(extra[0]) != 0 or stage1.index(extra[-1]) != len(stage1) - 1  # shuffled in
    answered = json.loads((tiny_build / NEEDLE_ANSWERS_FILE).read_text())  # the same needles, answers in words
    assert answered == vision_needle_records(tiny_build, 8)
    plain = [{key: r[key] for key in ("id", "images", "labels")} for r in sorted(extra, key=lambda r: r["id"])]
    assert vision_records(answered) == plain
    copies = json.loads((tiny_build / TILES_WITH_OBJECTS_FILE).read_text())  # stage 2's extra tiles with objects
    assert copies and copies == tiles_with_objects_records(stage2, 2)
    # stage 1b: every tile, the build's and the 2 extra scenes' (which stage 1 never sees), and a replay of the rest
    stage1b = json.loads((tiny_build / VISION_TILES_REPLAY_FILE).read_text())
    tiles = [r for r in stage1 if r["id"].startswith("rs_")]
    extra_tiles = json.loads((tiny_build / VISION_TILES_FILE).read_text())  # the extra tiles in words, for stage 2
    assert len(extra_tiles) == 8 and not any(r["id"].startswith("rsv_") for r in stage1 + stage2)
    replayed = [r for r in stage1b if not r["id"].startswith(("rs_", "rsv_"))]
    assert tiles and sorted(r["id"] for r in stage1b if r["id"].startswith(("rs_", "rsv_"))) == sorted(
        r["id"] for r in tiles + extra_tiles)
    assert len(replayed) == 5 and all(r in stage1 for r in replayed)
    assert all(r in stage1 for r in stage1b if r["id"].startswith("rs_"))  # the same labels and token targets
    assert all(r["token_labels"] for r in stage1b if r["id"].startswith("rsv_"))
    assert [r["id"] for r in stage1b][:len(tiles)] != [r["id"] for r in tiles]  # shuffled in
    again = write_single_image_records(tiny_build, tmp_path / "cache", vision_needles=8, vision_tile_scenes=2,
                                       tile_copies=2, tile_replay=5)
    assert json.loads(again.read_text()) == stage2 and json.loads(
        (tiny_build / VISION_TILES_REPLAY_FILE).read_text()) == stage1b  # seeded
    assert json.loads((tiny_build / "vision_train.json").read_text()) == stage1
    alone = tile_replay_records(stage1, {r["id"] for r in tiles}, 0)  # no replay: the tiles alone
    assert sorted(r["id"] for r in alone) == sorted(r["id"] for r in tiles)


def test_demo_data_cli_writes_every_stage_file_at_a_small_scale(tmp_path):
    from finetune.demo_data import main

    out, cache = tmp_path / "synthetic", tmp_path / "cache"
    assert main(["--out", str(out), "--scale", "0.004", "--cache-dir", str(cache), "--vision-needles", "500",
                 "--vision-tile-scenes", "1250", "--tile-copies", "3", "--tile-replay", "7000"]) == 0
    # at this scale: 5 extra tile scenes (20 tiles, for a stage 1b and a stage 2 only), 3 copies of the tiles
    # with objects, 28 replayed images in the stage-1b file
    extra_tiles = json.loads((out / VISION_TILES_FILE).read_text())
    assert [r["id"] for r in extra_tiles][::4] == [f"rsv_{k:05d}_t11" for k in range(5)] and len(extra_tiles) == 20
    stage1b_ids = [r["id"] for r in json.loads((out / VISION_TILES_REPLAY_FILE).read_text())]
    assert sum(not i.startswith(("rs_", "rsv_")) for i in stage1b_ids) == 28
    assert {r["id"] for r in extra_tiles} <= set(stage1b_ids)
    tiles_with_objects = json.loads((out / TILES_WITH_OBJECTS_FILE).read_text())
    assert len(tiles_with_objects) % 3 == 0 and tiles_with_objects
    files = {name: json.loads((out / name).read_text()) for name in (
        "vision_train.json", "single_train.json", "ct_train_shuffled.json", "rs_train_shuffled.json", "niah_train.json",
        "polish_train.json")}
    assert len(files["vision_train.json"]) == len(files["single_train.json"]) + 2  # 500 x 0.004 needles
    assert [r["id"] for r in json.loads((out / NEEDLE_ANSWERS_FILE).read_text())] == ["niah_vision_00000",
                                                                                       "niah_vision_00001"]
    assert len(files["ct_train_shuffled.json"]) == 2 * 3 and len(files["niah_train.json"]) == 4
    # polish: 6 presence-only conversations twice, the 2 studies' first version and the 2 scenes' first two,
    # a follow-up version of each study and scene, 4 NIAH
    polish_ids = [r["id"] for r in files["polish_train.json"]]
    assert len(polish_ids) == 6 * 2 + 2 + 2 * 2 + 2 + 2 + 4
    assert sum(i.endswith("_f00") for i in polish_ids) == 4 and sum(i.endswith("_p") for i in polish_ids) == 12
    # the polish's second file: the report alone of every second CT training study (of 2: the first)
    reports = json.loads((out / REPORTS_FILE).read_text())
    assert [r["id"] for r in reports] == [json.loads((out / "ct_train.json").read_text())[0]["id"] + "_rf"]
    # its third: each scene's first three shuffled versions cut to their count turns
    counted = [r["id"] + "_n" for r in json.loads((out / "rs_train_shuffled.json").read_text())
               if r["id"].endswith(("_c00", "_c01", "_c02"))]
    assert [r["id"] for r in json.loads((out / COUNTS_FILE).read_text())] == counted and counted
    # the place stage: each scene's first two versions cut to their row / column / tile turns, then a seeded
    # draw of polish records (585 x 0.004 = 2 at this scale)
    places = json.loads((out / PLACES_FILE).read_text())
    located = [r["id"] + "_l" for r in json.loads((out / "rs_train_shuffled.json").read_text())
               if r["id"].endswith(("_c00", "_c01")) and any(t["value"].startswith("Which row ")
                                                               for t in r["conversations"])]
    assert located and [r["id"] for r in places[:-2]] == located
    assert all(t["value"].removeprefix("<image>\n").startswith(SCENE_LOCATION_PREFIXES)
               for r in places[:-2] for t in r["conversations"][::2])
    assert all(r in files["polish_train.json"] for r in places[-2:])
    with pytest.raises(DemoDataError, match="niah_train.json"):
        write_polish_records(out, follow_up_sources=("niah_train.json",))
    records_only = ["--out", str(out), "--cache-dir", str(cache), "--records-only", "--vision-needles", "0"]
    assert main([*records_only, "--no-scene-tokens"]) == 0
    assert json.loads((out / NEEDLE_ANSWERS_FILE).read_text()) == []  # no extra needles: none to answer
    assert _without_token_labels(out / "vision_train.json") == vision_records(files["single_train.json"])
    assert main(records_only) == 0  # the shipped recipe: tiles and NIAH images with token targets too
    polish = json.loads((out / "polish_train.json").read_text())
    assert polish == files["polish_train.json"]  # the records-only rewrite is the same
    assert main([*records_only, "--polish-counts", "1", "2"]) == 0  # a count polish: 2 scenes x 1 version x 2
    with_counts = json.loads((out / "polish_train.json").read_text())
    assert with_counts[:len(polish)] == polish and [r["id"] for r in with_counts[len(polish):]] == [
        "rs_train_0000_c00_n", "rs_train_0001_c00_n"] * 2
    assert main([*records_only, "--polish-locations", "1", "1"]) == 0  # a place polish: each scene's row/column/tile
    with_places = json.loads((out / "polish_train.json").read_text())
    placed = [r["id"] + "_l" for r in json.loads((out / "rs_train_shuffled.json").read_text())
              if r["id"].endswith("_c00") and any(t["value"].startswith("Which row ") for t in r["conversations"])]
    assert placed and with_places[:len(polish)] == polish and [r["id"] for r in with_places[len(polish):]] == placed
    assert _without_token_labels(out / "vision_train.json", scene_tokens=True) == vision_records(
        files["single_train.json"])
    assert main([*records_only, "--slab-presence"]) == 0
    asked = json.loads((out / "single_train.json").read_text())
    assert {len(r["conversations"]) for r in asked if r["id"].startswith("ct")} == {12}
    assert _without_token_labels(out / "vision_train.json", scene_tokens=True) == vision_records(
        files["single_train.json"])
    assert json.loads((out / TILES_WITH_OBJECTS_FILE).read_text()) == []  # default: no extra tile copies
    assert json.loads((out / VISION_TILES_FILE).read_text()) == [] and not (out / VISION_TILE_SCENES_FILE).exists()
    assert main([*records_only, "--tile-copies", "2"]) == 0
    with_objects = [r for r in vision_records(files["single_train.json"]) if r["id"].startswith("rs_") and r["labels"]]
    assert len(json.loads((out / TILES_WITH_OBJECTS_FILE).read_text())) == 2 * len(with_objects) > 0
    assert not (out / TILE_COUNTS_FILE).exists()  # default: no tile count records
    assert main([*records_only, "--tile-copies", "2", "--tile-count-copies", "2"]) == 0
    asked = json.loads((out / TILE_COUNTS_FILE).read_text())
    assert len(asked) == 2 * 2 * len(with_objects) and all(len(r["conversations"]) == 6 for r in asked)


def _without_token_labels(vision_file: Path, scene_tokens: bool = False) -> list[dict]:
    """The records of a ``vision_train.json`` without the token targets (which every CT slab has, and with
    ``scene_tokens`` every tile and NIAH image too)."""
    records = json.loads(vision_file.read_text())
    assert all(("token_labels" in r) == (scene_tokens or r["id"].startswith("ct_")) for r in records)
    assert {r["token_grid"] for r in records if "token_grid" in r} == {DEMO_TOKEN_GRID}
    return [{k: v for k, v in r.items() if k not in ("token_labels", "token_grid")} for r in records]


def test_ct_token_labels_mark_the_cells_where_each_finding_is_drawn(tiny_build, tmp_path):
    from domain_data.medical.slices import slab_bounds
    from domain_data.synthetic.ct_phantom import make_ct_phantom

    vision = vision_records(single_image_records(tiny_build, tmp_path / "cache"))
    assert add_ct_token_labels(vision, tiny_build, DEMO_RENDER) == 2 * DEMO_RENDER["num_slices"]
    for record in vision:
        if not record["id"].startswith("ct_"):
            assert "token_labels" not in record
            continue
        assert list(record["token_labels"]) == ct_token_label_names() and record["token_grid"] == DEMO_TOKEN_GRID
        shown = {name for name, cells in record["token_labels"].items() if cells}
        assert shown <= set(record["labels"]), record["id"]  # never a cell where the image's labels have none
    # a nodule: the cell under its centre, on the slab that holds its centre plane, and nowhere on other sides
    phantom = make_ct_phantom(7, findings={"Lung nodule": {"count": 1, "side": "left", "radius_mm": 9.0}},
                              n_slices=120, size=128)
    truth = phantom.ground_truth()
    images = slab_token_labels(truth, phantom.labels, DEMO_RENDER, 16)
    nodule = truth["findings"]["Lung nodule"]["details"]["nodules"][0]
    z, y, x = nodule["centre_zyx"]
    slab = next(k for k, (first, last) in enumerate(slab_bounds(120, 16)) if first <= z <= last)
    cell = int((y + 0.5) * 160 / 128 // 32) * 5 + int((x + 0.5) * 160 / 128 // 32)
    assert cell in images[slab]["ct lung nodule"] == images[slab]["ct lung nodule left"]
    assert not any(image["ct lung nodule right"] or image["ct consolidation"] for image in images)
    answers = rendered_slice_answers(truth, DEMO_RENDER, 16)  # a slab cutting only the pole may show < 4 px
    assert {k for k, image in enumerate(images) if image["ct lung nodule"]} <= {
        k for k, answer in enumerate(answers) if "lung nodule" in answer}
    with pytest.raises(DemoDataError, match="slab images"):
        slab_token_labels(truth, phantom.labels, {**DEMO_RENDER, "window": "multi"}, 16)


def test_scene_token_labels_mark_each_object_kind_s_cells_and_the_needle_s(tiny_build, tmp_path):
    from PIL import Image

    from domain_data.synthetic.niah import _shape_mask, haystack_image, needle_image
    from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS
    from domain_data.token_cells import cell_pixel_counts

    vision = vision_records(single_image_records(tiny_build, tmp_path / "cache"))
    tiles = [r for r in vision if r["id"].startswith("rs_")]
    needles = [r for r in vision if r["id"].startswith("niah_")]
    assert add_scene_token_labels(vision, tiny_build) == len(tiles) + len(needles) > 0
    for record in tiles + needles:
        names = tile_token_label_names() if record["id"].startswith("rs_") else needle_token_label_names()
        assert list(record["token_labels"]) == names and record["token_grid"] == DEMO_TOKEN_GRID
        shown = {name for name, cells in record["token_labels"].items() if cells}
        assert shown <= set(record["labels"]), record["id"]  # a tile without ships has no ship cell
        if record["id"].startswith("rs_") or record["labels"]:
            assert shown == {n for n in record["labels"] if n in names}, record["id"]  # and one with them has
    assert all("token_labels" not in r for r in vision if r["id"].startswith("ct_"))  # add_ct_token_labels' job
    # a tile: the cell under each object's centre, on the 336-px tile cut into 5 x 5 cells of 67.2 px
    scene = json.loads((tiny_build / "rs_train_scenes.jsonl").read_text().splitlines()[0])["ground_truth"]
    for item in scene["objects"]:
        row, col = item["tile"]
        x, y = item["cx"] - (col - 1) * 336, item["cy"] - (row - 1) * 336  # the scenes are unpadded
        cell = int(y * 5 // 336) * 5 + int(x * 5 // 336)
        assert cell in tile_token_labels(scene, row, col)[f"tile {PLURALS[item['kind']]} >= 1"]
    empty = {name: [] for name in tile_token_label_names()}
    occupied = {tuple(item["tile"]) for item in scene["objects"]}
    free = [(r, c) for r in range(1, scene["grid"]["rows"] + 1) for c in range(1, scene["grid"]["cols"] + 1)
            if (r, c) not in occupied]
    assert all(tile_token_labels(scene, r, c) == empty for r, c in free)
    assert len(OBJECT_KINDS) == len(empty)
    with pytest.raises(DemoDataError, match="outside"):
        tile_token_labels(scene, scene["grid"]["rows"] + 1, 1)
    # a needle: the cells its shape covers by >= 4 px of the 160-px canvas (112-px image: >= 2 px), from its colour
    image = needle_image(3, "red", "cross", 112, 9)
    shape = _shape_mask("cross", 112, np.random.default_rng([3, 9, 11]))
    expected = np.flatnonzero(cell_pixel_counts(shape, 5) * (160 / 112) ** 2 >= 4).tolist()
    got = needle_token_labels(image, ["niah needle", "niah colour red", "niah shape cross"])
    assert got["niah needle"] == got["niah colour red"] == got["niah shape cross"] == expected

    assert not got["niah colour blue"] and not got["niah shape circle"]
    assert needle_token_labels(haystack_image(3, 9, 112), []) == {name: [] for name in needle_token_label_names()}
    with pytest.raises(DemoDataError, match="no pixel of the needle's colour blue"):
        needle_token_labels(image, ["niah needle", "niah colour blue", "niah shape cross"])
    saved = np.asarray(Image.open(needles[-1]["images"][0]).convert("RGB"))
    assert needle_token_labels(saved, needles[-1]["labels"]) == needles[-1]["token_labels"]


def test_tile_centre_labels_put_each_object_in_the_cell_of_its_centre_once(tiny_build, tmp_path):
    from domain_data.synthetic.satellite import PLURALS

    # a padded 2 x 2 grid of 336-px tiles (cells of 67.2 px); source x = tile x - pad_left + (col - 1) * 336
    truth = {"tile_size": 336, "grid": {"rows": 2, "cols": 2, "pad_left": 10, "pad_top": 20}, "objects": [
        {"kind": "ship", "tile": [1, 2], "cx": 336 - 10 + 70, "cy": 0 - 20 + 10},      # cell (0, 1)
        {"kind": "ship", "tile": [1, 2], "cx": 336 - 10 + 100, "cy": 0 - 20 + 60},     # cell (0, 1) again
        {"kind": "building", "tile": [2, 1], "cx": -10 + 335, "cy": 336 - 20 + 200},  # cell (2, 4)
        {"kind": "ship", "tile": [2, 2], "cx": 500, "cy": 500}]}                      # another tile
    labels = tile_centre_labels(truth, 1, 2)
    assert list(labels) == tile_centre_label_names() and len(labels) == 6
    assert labels["tile ships centres >= 1"] == labels["tile ships centres >= 2"] == [1]
    assert all(not cells for name, cells in labels.items() if not name.startswith("tile ships"))
    assert tile_centre_labels(truth, 2, 1)["tile buildings centres >= 1"] == [2 * 5 + 4]
    with pytest.raises(DemoDataError, match="outside"):
        tile_centre_labels(truth, 3, 1)
    # on a built scene the cells add up to every tile's count, and the records name the labels the cells show
    scene = json.loads((tiny_build / "rs_train_scenes.jsonl").read_text().splitlines()[0])["ground_truth"]
    for row in range(1, scene["grid"]["rows"] + 1):
        for col in range(1, scene["grid"]["cols"] + 1):
            got = tile_centre_labels(scene, row, col)
            for kind, count in zip(("ship", "storage tank", "building"), tile_object_counts(scene["objects"], row, col),
                                   strict=True):
                assert sum(len(got[f"tile {PLURALS[kind]} centres >= {k}"]) for k in (1, 2)) == count  # none has 3 / cell
    vision = [r for r in vision_records(single_image_records(tiny_build, tmp_path / "cache")) if r["id"].startswith("rs_")]
    add_scene_token_labels(vision, tiny_build, centres=True)
    for record in vision:
        shown = {name for name, cells in record["token_labels"].items() if cells and "centres" in name}
        assert shown == {name for name in record["labels"] if "centres" in name}, record["id"]


def test_vision_tile_records_cut_extra_scenes_into_labelled_tiles(tiny_build, tmp_path):
    from PIL import Image

    from domain_data.synthetic.satellite import make_scene

    tiles = vision_tile_records(tiny_build, 3, seed=0)
    assert [t["id"] for t in tiles[:4]] == [f"rsv_00000_t{r}{c}" for r in (1, 2) for c in (1, 2)] and len(tiles) == 12
    truths = [json.loads(line) for line in (tiny_build / VISION_TILE_SCENES_FILE).read_text().splitlines()]
    scene = make_scene(VISION_TILE_SEED_BASE + 2, 672, 672, object_scale=DEMO_BUILD["rs_object_scale"])
    assert truths[2]["ground_truth"] == scene.ground_truth()
    assert np.array_equal(np.asarray(Image.open(tiles[-1]["images"][0])), scene.image[336:, 336:])  # row 2, col 2
    assert tiles[-1]["conversations"][1]["value"] == tile_counts_answer(scene.ground_truth()["objects"], 2, 2)
    vision = vision_records(tiles)
    assert add_scene_token_labels(vision, tiny_build) == 12  # their scenes' ground truth gives the token targets
    shown = [{n for n, cells in r["token_labels"].items() if cells} for r in vision]
    assert all(names == {n for n in r["labels"] if n.endswith(">= 1")} for names, r in zip(shown, vision, strict=True))
    assert sum(len(r["labels"]) for r in vision) == sum(sum(t["ground_truth"]["counts"].values()) for t in truths)
    with pytest.raises(DemoDataError, match="whole 336-px tiles"):
        vision_tile_records(tmp_path, 1, side=700)


def test_tiles_with_objects_records_copy_only_the_tiles_that_count_something():
    def single(record_id, question, answer):
        return {"id": record_id, "images": [f"/{record_id}.png"], "layout": "images",
                "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}

    records = [single("rs_1_t11", TILE_QUESTION, "ships 0, storage tanks 0, buildings 0"),
               single("rs_1_t12", TILE_QUESTION, "ships 2, storage tanks 0, buildings 0"),
               single("ct_1_s00", SLICE_QUESTION, "cardiomegaly"),
               single("rs_2_t21", TILE_QUESTION, "ships 0, storage tanks 0, buildings 1")]
    copies = tiles_with_objects_records(records, 3, seed=0)
    assert sorted(r["id"] for r in copies) == sorted(f"{i}_x{k}" for i in ("rs_1_t12", "rs_2_t21") for k in range(3))
    assert {r["id"]: r["conversations"][1]["value"] for r in copies}["rs_2_t21_x2"] == "ships 0, storage tanks 0, buildings 1"
    assert [r["id"] for r in copies] == [r["id"] for r in tiles_with_objects_records(records, 3, seed=0)]  # seeded
    assert tiles_with_objects_records(records, 0) == [] and records[1]["id"] == "rs_1_t12"  # sources untouched


def test_vision_records_turn_every_answer_into_label_names():
    def single(question, answer):
        return {"id": "x", "images": ["/a.png"], "conversations": [{"value": question}, {"value": answer}]}

    records = vision_records([
        single(SLICE_QUESTION, "lung nodule (both), cardiomegaly, emphysema (left)"),
        single(SLICE_QUESTION, "none"),
        single(TILE_QUESTION, "ships 2, storage tanks 0, buildings 1"),
        single(NEEDLE_QUESTION, "red square"),
        single(NEEDLE_QUESTION, "none"),
    ])
    assert [r["labels"] for r in records] == [
        ["ct lung nodule", "ct lung nodule left", "ct lung nodule right", "ct cardiomegaly", "ct emphysema",
         "ct emphysema left"],
        [],
        ["tile ships >= 1", "tile ships >= 2", "tile buildings >= 1"],
        ["niah needle", "niah colour red", "niah shape square"],
        [],
    ]
    assert all(r["images"] == ["/a.png"] for r in records)
    with pytest.raises(DemoDataError, match="no vision labels"):
        vision_records([single("What is this?", "a cat")])


def test_study_bags_hold_each_study_s_slabs_in_order_with_the_union_of_their_labels():
    def labelled(record_id, labels):
        return {"id": record_id, "images": [f"/{record_id}.png"], "labels": labels}

    bags = study_bag_records([
        labelled("ct_train_0002_s10", ["ct emphysema", "ct emphysema left"]),
        labelled("ct_train_0001_s01", ["ct lung nodule", "ct lung nodule right"]),
        labelled("rs_train_0001_t11", ["tile ships >= 1"]),
        labelled("ct_train_0002_s02", []),
        labelled("ct_train_0001_s00", ["ct cardiomegaly"]),
        labelled("niah_train_0001_i00", []),
    ])
    assert bags == [
        {"id": "ct_train_0001", "images": ["/ct_train_0001_s00.png", "/ct_train_0001_s01.png"],
         "labels": ["ct cardiomegaly", "ct lung nodule", "ct lung nodule right"]},
        {"id": "ct_train_0002", "images": ["/ct_train_0002_s02.png", "/ct_train_0002_s10.png"],
         "labels": ["ct emphysema", "ct emphysema left"]},
    ]


def _train_chain(tmp_path: Path, cache: Path, stages: Sequence[tuple[str, list, list[str]]]) -> tuple[Path, Recipe]:
    """Train each (recipe name, train files, extra overrides) 2 steps from the previous stage's model, into
    ``tmp_path / name``; the last stage's saved model and its recipe."""
    from finetune.train import run_training

    base, recipe = None, None
    for name, files, extra in stages:
        overrides = [f"train_data={','.join(map(str, files))}", f"output_dir={tmp_path / name}",
                     f"image_cache_dir={cache}", "max_steps=2", "logging_steps=1", "save_steps=1000", *extra]
        recipe = load_recipe(name, overrides + ([f"base_model={base}"] if base else []))
        summary = run_training(recipe)
        assert summary["global_step"] == 2 and math.isfinite(summary["last_loss"]), name
        assert summary["train_samples"] == sum(len(json.loads(Path(path).read_text())) for path in files)
        base = summary["saved_to"]
    return Path(base), recipe


def test_stage_1b_recipe_follows_stage_1_and_weighs_the_tile_labels():
    first, tiles = load_recipe("demo_vision"), load_recipe("demo_vision_tiles")
    assert tiles.stage == "vision" and tiles.mode == "full" and tiles.base_model == f"{first.output_dir}/model"
    assert tiles.train_data == [str(Path(first.train_data[0]).parent / VISION_TILES_REPLAY_FILE)]
    assert tiles.render == first.render == DEMO_RENDER and tiles.output_dir != first.output_dir
    assert tiles.vision_label_weights["tile"] > max(w for k, w in tiles.vision_label_weights.items() if k != "tile")


def test_demo_recipes_train_a_few_steps_in_five_stages(tiny_build, tmp_path):
    """The bundled chain, each stage 2 steps from the one before on the tiny build's files: stage 1b on the
    tile replay file, stage 2 with its projector seeded from 1b's head, stage 3 with grid places, the polish
    with the report-first and count records."""
    cache = tmp_path / "cache"
    single = write_single_image_records(tiny_build, cache, vision_needles=4, vision_tile_scenes=2, tile_copies=2,
                                        tile_replay=5)
    whole = [str(p) for p in write_shuffled_records(tiny_build)] + [str(tiny_build / "niah_train.json")]
    batch = "per_device_train_batch_size=4"
    stage2_files = [single, tiny_build / NEEDLE_ANSWERS_FILE, tiny_build / VISION_TILES_FILE,
                    tiny_build / TILES_WITH_OBJECTS_FILE]
    saved, recipe = _train_chain(tmp_path, cache, (
        ("demo_vision", [tiny_build / "vision_train.json"], [batch]),
        ("demo_vision_tiles", [tiny_build / VISION_TILES_REPLAY_FILE], [batch]),
        ("demo_warmup", stage2_files, [batch, f"projector_init_head={tmp_path / 'demo_vision_tiles'}"]),
        ("demo", whole, []),
        ("demo_polish", [write_polish_records(tiny_build), write_report_records(tiny_build),
                         write_count_records(tiny_build)], [])))
    assert earlier_stages(tmp_path / "demo_polish") == [
        tmp_path / name for name in ("demo_vision", "demo_vision_tiles", "demo_warmup", "demo")]
    assert json.loads((saved / INFERENCE_DEFAULTS_FILE).read_text()) == {"render": recipe.render}
    config = LongLlavaConfig.from_pretrained(saved)
    assert config.to_dict()["text_config"]["hidden_size"] == 256 and config.grid_places == 8


def test_earlier_stages_follow_base_model_back_to_the_preset(tmp_path):
    for name, base in (("a", "preset:demo"), ("b", f"{tmp_path}/a/model"), ("c", f"{tmp_path}/b/model")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.yaml").write_text(yaml.safe_dump({"base_model": base}))
    assert earlier_stages(tmp_path / "c") == [tmp_path / "a", tmp_path / "b"]
    assert earlier_stages(tmp_path / "a") == []


def _subset_agreement(task: str, expected: dict[str, str], out_dir: Path) -> tuple[float, dict, dict]:
    rows = list(read_predictions(out_dir / "predictions.jsonl").values())
    assert {r["id"] for r in rows} == set(expected)
    agree = sum(r["prediction"] == expected[r["id"]] for r in rows) / len(rows)
    recorded = [{**r, "prediction": expected[r["id"]]} for r in rows]
    return agree, METRICS[task](rows)["headline"], METRICS[task](recorded)["headline"]


def test_evaluate_demo_reproduces_the_card_on_a_held_out_subset(tmp_path, scores):
    """CI-sized: the first held-out CT study, satellite scene and two 100-image haystacks, scored with
    ``longllava evaluate ... --model demo``; the answers must be those of the card's full run."""
    from longllava.cli import main

    subset = scores["ci_subset"]
    data = tmp_path / "heldout"
    build_heldout_subset(data, n_ct=subset["n_ct"], n_rs=subset["n_rs"])
    plan = evaluation_plan(data)
    runs = {"ct": plan["ct"], "rs": plan["rs"], "niah": ("niah", subset["niah_spec"])}
    for name, (task, spec) in runs.items():
        out = tmp_path / name
        assert main(["evaluate", task, "--model", "demo", "--data", spec, "--out", str(out)]) == 0
        agree, measured, recorded = _subset_agreement(task, subset["predictions"][name], out)
        assert agree >= 0.9, f"{name}: only {agree:.0%} of answers match the card's run"
        for key, value in recorded.items():
            assert measured[key] == pytest.approx(value, abs=0.15), (name, key)


def test_card_figures_are_the_recorded_scores(scores):
    """The card's score table is the one generated from eval_scores.json (no hand-edited numbers)."""
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert card_tables(scores["full"]) in card
    for name, keys in CARD_ROWS.items():
        for key in keys:
            if key in scores["full"].get(name, {}).get("model", {}):
                value = scores["full"][name]["model"][key]
                baseline = scores["full"][name]["majority_baseline"][key]
                assert f"| {value:.3f} | {baseline:.3f} |" in card, (name, key)


@pytest.mark.slow
def test_full_held_out_scores_reproduce(tmp_path, scores):
    """Minutes: rebuild the held-out sets and rescore everything; figures within noise of the card."""
    from finetune.demo_scores import run_scores

    data = tmp_path / "heldout"
    build_heldout_subset(data, n_ct=scores["heldout"]["n_ct"], n_rs=scores["heldout"]["n_rs"])
    results = run_scores("demo", data, tmp_path / "eval")
    for name, result in results.items():
        for key, value in scores["full"][name]["model"].items():
            assert result["model"][key] == pytest.approx(value, abs=0.03), (name, key)
