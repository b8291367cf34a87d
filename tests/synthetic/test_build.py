"""build_synthetic_sets: layout, record formats, agreement between files, byte-identical rebuilds."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from domain_data.synthetic.build import build_synthetic_sets, main
from domain_data.synthetic.ct_phantom import read_label_map
from domain_data.synthetic.errors import SyntheticDataError

SMALL = dict(
    n_ct_train=2,
    n_ct_test=2,
    n_rs_train=2,
    n_rs_test=2,
    ct_size=48,
    ct_slices=(16, 20),
    dicom_every=2,
    rs_sizes=((336, 400), (400, 700)),
    n_niah=2,
    niah_images=6,
    niah_size=40,
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("sets")
    manifest = build_synthetic_sets(out / "a", seed=5, **SMALL)
    return out / "a", manifest


def test_same_seed_byte_identical_text_and_identical_arrays(built, tmp_path):
    first, _ = built
    build_synthetic_sets(tmp_path / "b", seed=5, **SMALL)
    second = tmp_path / "b"
    text_files = sorted(
        p.relative_to(first) for p in first.rglob("*") if p.suffix in (".json", ".jsonl", ".csv")
    )
    assert len(text_files) >= 10
    for rel in text_files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    for rel in sorted(p.relative_to(first) for p in first.rglob("*.tif")):
        with rasterio.open(first / rel) as a, rasterio.open(second / rel) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.transform == b.transform and a.crs == b.crs
    for rel in sorted(p.relative_to(first) for p in first.rglob("*.nii.gz")):
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    label_maps = sorted(p.relative_to(first) for p in first.rglob("*_labels.npy.gz"))
    assert len(label_maps) == SMALL["n_ct_train"] + SMALL["n_ct_test"]  # one per study, NIfTI or DICOM
    for rel in label_maps:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    build_synthetic_sets(tmp_path / "c", seed=6, **SMALL)
    assert (tmp_path / "c/ct_test.jsonl").read_bytes() != (first / "ct_test.jsonl").read_bytes()


def test_first_test_index_builds_the_later_items_of_a_larger_build(built, tmp_path):
    """Items are seeded by index alone: test items from index 1 on are the larger build's items 1.. ."""
    first, _ = built
    options = dict(SMALL, n_ct_train=0, n_rs_train=0, n_ct_test=1, n_rs_test=1, n_niah=0)
    manifest = build_synthetic_sets(tmp_path / "later", seed=5, first_test_index=1, **options)
    assert manifest["config"]["first_test_index"] == 1
    for name in ("ct_test.jsonl", "rs_test_fitrsfg.jsonl", "ct_test_studies.jsonl", "rs_test_scenes.jsonl"):
        later = read_jsonl(tmp_path / "later" / name)
        whole = read_jsonl(first / name)
        assert later and later == [row for row in whole if "_0001" in json.dumps(row, sort_keys=True)], name
    assert (tmp_path / "later/ct/test").is_dir() and not list((tmp_path / "later").rglob("*_0000*"))
    with pytest.raises(SyntheticDataError, match="first_test_index"):
        build_synthetic_sets(tmp_path / "bad", seed=5, first_test_index=-1, **options)


def test_files_and_paths(built):
    out, manifest = built
    for name in manifest["files"]:
        assert (out / name).is_file(), name
    assert (out / "ct/train/ct_train_0001").is_dir()  # every 2nd study as a DICOM series
    assert (out / "ct/train/ct_train_0000.nii.gz").is_file()
    for study in read_jsonl(out / "ct_train_studies.jsonl") + read_jsonl(out / "ct_test_studies.jsonl"):
        labels = read_label_map(out / study["label_map"])
        assert list(labels.shape) == study["ground_truth"]["shape_zyx"] and labels.dtype == np.uint8
    for name in ("ct_train.json", "rs_train.json"):
        for record in json.loads((out / name).read_text()):
            assert (out / record["image"]).exists()
            assert record["conversations"][0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in record["conversations"]) == 1
    assert {r["layout"] for r in json.loads((out / "ct_train.json").read_text())} == {"series"}
    assert {r["layout"] for r in read_jsonl(out / "rs_test.jsonl")} == {"grid"}
    for record in read_jsonl(out / "niah_test.jsonl"):
        assert len(record["images"]) == 6 and all((out / p).is_file() for p in record["images"])
        assert "needles" in record["images"][record["needle_index"]]
        assert record["conversations"][1]["value"] == record["answer"]
    assert str(out) not in (out / "manifest.json").read_text()


def test_test_answers_agree_with_labels_and_ground_truth(built):
    out, _ = built
    with open(out / "ct_test_labels.csv", newline="") as f:
        labels = {row.pop("VolumeName"): row for row in csv.DictReader(f)}
    records = read_jsonl(out / "ct_test.jsonl")
    studies = {s["id"]: s for s in read_jsonl(out / "ct_test_studies.jsonl")}
    presence = [r for r in records if r["kind"] == "presence"]
    assert len(presence) == 2 * 5
    for record in presence:
        answer = record["conversations"][1]["value"]
        assert answer == ("Yes" if labels[record["image"]][record["finding"]] == "1" else "No")
        truth = studies[record["study"]]["ground_truth"]["findings"][record["finding"]]
        assert truth["present"] == (answer == "Yes")
    assert any(r["kind"] == "report" for r in records)


def test_fitrsfg_items_mirror_rs_test_records(built):
    out, _ = built
    items, records = read_jsonl(out / "rs_test_fitrsfg.jsonl"), read_jsonl(out / "rs_test.jsonl")
    assert [i["question_id"] for i in items] == [r["id"] for r in records]
    for item, record in zip(items, records):
        assert item["ground_truth"] == record["conversations"][1]["value"]
        assert record["conversations"][0]["value"] == "<image>\n" + item["question"]
        assert item["category"] == record["kind"]
    scenes = {s["id"]: s["ground_truth"] for s in read_jsonl(out / "rs_test_scenes.jsonl")}
    for record in records:
        if record["kind"] == "count":
            assert record["conversations"][1]["value"] == str(
                scenes[record["scene"]]["counts"][record["object"]]
            )


@pytest.mark.skipif(
    importlib.util.find_spec("domain_data.remote_sensing.datasets") is None,
    reason="domain_data.remote_sensing.datasets not available",
)
def test_project_fitrs_loaders_read_the_sets(built):
    from domain_data.remote_sensing.datasets import load_fitrs_conversations, load_fitrsfg_bench

    out, _ = built
    assert len(load_fitrs_conversations(out / "rs_train.json")) == 2
    bench = load_fitrsfg_bench(out / "rs_test_fitrsfg.jsonl")
    assert bench[0].image == out / "rs/test/rs_test_0000.tif"


def test_cli_entry_and_bad_options(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path / "cli"),
                "--seed",
                "1",
                "--n-ct-train",
                "0",
                "--n-ct-test",
                "1",
                "--n-rs-train",
                "0",
                "--n-rs-test",
                "1",
                "--ct-size",
                "48",
                "--ct-slices",
                "16",
                "16",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["ct_test_studies"] == 1
    with pytest.raises(SyntheticDataError):
        build_synthetic_sets(tmp_path / "x", 0, 1, 1, 1, 1, colour="blue")
    with pytest.raises(SyntheticDataError):
        build_synthetic_sets(tmp_path / "x", 0, -1, 1, 1, 1)
