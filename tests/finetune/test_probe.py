"""longllava probe-images: own vs swapped images tells a model that reads its pictures from one that does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.probe import image_reliance, swap_partners, verdict_of


def test_swap_partners_give_every_record_other_images_of_the_same_count():
    sets = [("a", "b"), ("c", "d", "e"), ("f", "g"), ("a", "b"), (), ("h", "i", "j"), ("k",) * 5, ("l", "m")]
    partners = swap_partners(sets, seed=0)
    assert set(partners) == {0, 1, 2, 3, 5, 7}  # the lone 5-image record and the image-less one get none
    assert all(sets[partners[i]] != sets[i] and len(sets[partners[i]]) == len(sets[i]) for i in partners)
    assert sets[partners[0]] == sets[partners[3]]  # two questions about one study get the same other study
    assert partners == swap_partners(sets, seed=0)
    many = [(str(i),) for i in range(12)]
    assert swap_partners(many, 1) != swap_partners(many, 2)
    assert swap_partners([("a",), ("a",)]) == {}  # one distinct set: nothing to swap with


def test_verdicts():
    assert verdict_of((0.2, 0.6), 0.9) == "the answers depend on the images"
    assert verdict_of((-0.02, 0.04), 0.5).startswith("no evidence")
    assert verdict_of((0.1, 0.3), 0.4).startswith("no evidence")  # a few outliers, most prefer neither
    assert "wrong images" in verdict_of((-0.5, -0.1), 0.1)


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory, colour_set, make_recipe) -> Path:
    """The tiny model trained to name the colour of a flat image: it has to read the pixels."""
    from finetune.train import run_training

    out = tmp_path_factory.mktemp("colour_model")
    recipe = make_recipe(colour_set, out, mode="full", train_vision_tower=True, max_steps=60, pack=False,
                         per_device_train_batch_size=4, learning_rate=3e-3, save_steps=1000,
                         image_cache_dir=str(out / "cache"))
    return Path(run_training(recipe)["saved_to"])


def test_a_model_trained_on_colours_depends_on_its_images(colour_model, colour_set):
    result = image_reliance(str(colour_model), str(colour_set), limit=None, show_progress=False)
    assert result.n_records == 12 and result.n_skipped == 0
    assert result.verdict == "the answers depend on the images", result.summary_line()
    assert result.mean_swapped_loss > result.mean_own_loss and result.prefer_own >= 0.6
    # swapping a red image for another red one changes little; for a green or blue one, a lot
    same = [r["gap"] for r in result.per_record if _colour(r["id"]) == _colour(r["swapped_with"])]
    different = [r["gap"] for r in result.per_record if _colour(r["id"]) != _colour(r["swapped_with"])]
    assert different and sum(different) / len(different) > max([0.0, *same])


def _colour(record_id: str) -> int:
    return int(record_id.split("-")[1]) % 3  # write_colour_set cycles red, green, blue


def test_identical_pictures_give_ties_and_no_evidence(colour_model, colour_set, tmp_path):
    records = [json.loads(line) for line in colour_set.read_text().splitlines()]
    for i, record in enumerate(records):  # twelve files, one picture
        record["image"] = str(shutil.copy(colour_set.parent / "img00.png", tmp_path / f"same{i:02d}.png"))
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = image_reliance(str(colour_model), str(data), limit=6, show_progress=False)
    assert result.n_records == 6 and result.ties == 1.0 and abs(result.mean_gap) < 1e-6
    assert result.verdict.startswith("no evidence")


def test_cli_prints_the_verdict_and_writes_per_record_losses(colour_model, colour_set, tmp_path, capsys):
    from longllava.cli import main

    assert main(["probe-images", "--model", str(colour_model), "--data", str(colour_set), "--limit", "6",
                 "--out", str(tmp_path / "probe")]) == 0
    assert "own images better for" in capsys.readouterr().out
    saved = json.loads((tmp_path / "probe" / "image_reliance.json").read_text())
    assert len(saved["per_record"]) == 6 and {"own_loss", "swapped_loss", "gap"} <= set(saved["per_record"][0])


def test_too_few_records_to_swap_is_a_clear_error(colour_model, colour_set, tmp_path):
    from finetune import FinetuneError

    data = tmp_path / "one.jsonl"
    shutil.copy(colour_set.parent / "img00.png", tmp_path / "img00.png")
    data.write_text(colour_set.read_text().splitlines()[0] + "\n")
    with pytest.raises(FinetuneError, match="no two records have different images of the same count"):
        image_reliance(str(colour_model), str(data), show_progress=False)
