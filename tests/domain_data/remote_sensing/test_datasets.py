"""FIT-RS training JSON and FIT-RSFG-Bench JSONL as typed records; clear errors for broken files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from domain_data.remote_sensing.datasets import (
    load_answers,
    load_fitrs_conversations,
    load_fitrsfg_bench,
    parse_star_crop_name,
)
from domain_data.remote_sensing.errors import DatasetInputError
from domain_data.remote_sensing.metrics import fitrsfg_vqa_scores

# rasterio's own Affine arithmetic warns about `*` (affine 3); not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")

NAMES = ["P0001__512__0___512.png", "P0002__512__1024___2048.png"]


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgv2_split_512_100_vaild"
    folder.mkdir()
    for name in NAMES:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)
    return folder


def _conversation(name: str) -> dict:
    return {"id": name[:5], "image": name, "conversations": [
        {"from": "human", "value": "<image>\n[detection]Locate all ships."},
        {"from": "gpt", "value": "There is 1 ship in the image: <rbox>({<50.00><40.00><8.00><3.00>|<45>})</rbox>"},
    ]}


def test_training_json_list_and_jsonl(tmp_path, image_dir):
    records = [_conversation(n) for n in NAMES]
    as_list = tmp_path / "train.json"
    as_list.write_text(json.dumps(records))
    as_lines = tmp_path / "train.jsonl"
    as_lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for path in (as_list, as_lines):
        loaded = load_fitrs_conversations(path, image_root=image_dir)
        assert [r.image for r in loaded] == [image_dir / n for n in NAMES]
        assert loaded[0].turns[0].speaker == "human" and loaded[0].id == "P0001"
        assert [m["role"] for m in loaded[1].messages()] == ["user", "assistant"]


def test_missing_images_are_listed_with_advice(tmp_path, image_dir):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_conversation(n) for n in NAMES + ["P0404__512__0___0.png"]]))
    with pytest.raises(DatasetInputError, match=r"1 image\(s\) not found .*P0404__512__0___0.png.*image_root="):
        load_fitrs_conversations(path, image_root=image_dir)
    assert len(load_fitrs_conversations(path, image_root=image_dir, check_images=False)) == 3


def test_bench_jsonl_with_text_or_question(tmp_path, image_dir):
    path = image_dir / "test_FITRS_vqa_eval.jsonl"
    rows = [{"question_id": 1, "image": NAMES[0], "text": "Is there a ship?", "category": "presence",
             "ground_truth": "yes"},
            {"question_id": "q2", "image": NAMES[1], "question": "How many planes?", "category": "counting",
             "ground_truth": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_fitrsfg_bench(path)  # image_root defaults to the file's folder
    assert [(i.question_id, i.question, i.category) for i in items] == [
        ("1", "Is there a ship?", "presence"), ("q2", "How many planes?", "counting")]
    assert items[1].image == image_dir / NAMES[1]


@pytest.mark.parametrize("content, message", [
    ('{"question_id": 1, "image": "a.png", "text": "q", "ground_truth": "yes"}\n{oops\n', "line 2 is not valid JSON"),
    ('{"question_id": 1, "text": "q", "ground_truth": "yes"}\n', "missing key\\(s\\) image"),
    ('{"question_id": 1, "image": "a.png", "ground_truth": "yes"}\n', "no question text"),
    ("", "is empty"),
])
def test_broken_bench_files(tmp_path, content, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetInputError, match=message):
        load_fitrsfg_bench(path, check_images=False)


def test_broken_training_records(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}]))
    with pytest.raises(DatasetInputError, match="speaker 'robot'"):
        load_fitrs_conversations(path, check_images=False)
    with pytest.raises(DatasetInputError, match="no such FIT-RS training JSON file"):
        load_fitrs_conversations(tmp_path / "absent.json")
    with pytest.raises(DatasetInputError, match="is a folder"):
        load_fitrs_conversations(tmp_path)


def test_star_crop_names():
    crop = parse_star_crop_name("some/dir/P1234__512__1024___2048.png")
    assert (crop.star_id, crop.size, crop.x, crop.y) == ("P1234", 512, 1024, 2048)
    assert parse_star_crop_name("holiday.png") is None


def test_answers_file_scores(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [{"question_id": 1, "answer": "Yes.", "category": "presence", "ground_truth": "yes"},
            {"question_id": 2, "answer": "3", "category": "counting", "ground_truth": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    scores = fitrsfg_vqa_scores(load_answers(path))
    assert scores["official"]["overall"].value == 0.5 and scores["lenient"]["overall"].value == 1.0
