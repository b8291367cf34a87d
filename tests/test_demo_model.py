"""The bundled demo model: its recipe trains, the committed checkpoint is what the recipe describes, and
``longllava evaluate --model demo`` on a small held-out subset reproduces the model card's predictions."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from finetune.demo_data import (
    DEMO_BUILD,
    DemoDataError,
    build_heldout_subset,
    build_niah_train,
    per_question_records,
    split_per_question,
    write_per_question_records,
)
from finetune.demo_scores import CARD_ROWS, card_tables, evaluation_plan
from finetune.evaluate import METRICS, read_predictions
from finetune.train import INFERENCE_DEFAULTS_FILE, load_recipe
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


def test_committed_checkpoint_matches_the_recipe():
    recipe = load_recipe("demo")
    assert recipe.base_model.startswith("preset:") and recipe.mode == "full"
    preset = LongLlavaConfig.from_preset(recipe.base_model.split(":", 1)[1])
    saved = LongLlavaConfig.from_pretrained(DEMO_DIR)
    assert saved.pooled_grid == preset.pooled_grid
    saved_vision = {k: v for k, v in saved.vision_config.to_dict().items() if k not in STORAGE_FIELDS}
    assert saved_vision == {k: v for k, v in preset.vision_config.to_dict().items() if k not in STORAGE_FIELDS}
    ignored = TOKENIZER_FIELDS | STORAGE_FIELDS
    saved_text = {k: v for k, v in saved.text_config.to_dict().items() if k not in ignored}
    preset_text = {k: v for k, v in preset.text_config.to_dict().items() if k not in ignored}
    assert saved_text == preset_text
    # the recipe that trained the checkpoint (copied from the run) is the bundled one, key for key
    trained_with = yaml.safe_load((DEMO_DIR / "training_recipe.yaml").read_text())
    assert trained_with == asdict(recipe)
    defaults = json.loads((DEMO_DIR / INFERENCE_DEFAULTS_FILE).read_text())
    assert defaults == {"render": recipe.render}


def test_bundled_model_loads_every_weight_in_fp32():
    model, processor = load_model("demo")
    assert next(model.parameters()).dtype.is_floating_point
    assert processor.tokens_per_image == model.config.tokens_per_image == 25
    assert model.config.image_size == 160


def _tiny_training_data(root: Path) -> list[str]:
    from domain_data.synthetic.build import build_synthetic_sets

    options = {k: v for k, v in DEMO_BUILD.items() if k not in ("n_ct_test", "n_rs_test", "n_ct_train", "n_rs_train")}
    build_synthetic_sets(root, n_ct_train=1, n_ct_test=0, n_rs_train=1, n_rs_test=0, **options)
    build_niah_train(root, n_records=2, pool_size=8, images_range=(3, 4))
    return [str(path) for path in write_per_question_records(root)]  # what the recipe trains on


def _conversation(*turns: str, tag: bool = True) -> dict:
    values = [f"<image>\n{turns[0]}" if tag else turns[0], *turns[1:]]
    return {"id": "s1", "image": "ct/a.nii.gz", "layout": "series",
            "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]}


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


def test_per_question_records_are_a_seeded_shuffle_of_all_questions():
    records = [dict(_conversation(f"q{k}a", "a", f"q{k}b", "b"), id=f"s{k}") for k in range(20)]
    first, again, other = (per_question_records(records, seed) for seed in (0, 0, 1))
    assert first == again and first != other
    assert sorted(p["id"] for p in first) == sorted(f"s{k}_q0{j}" for k in range(20) for j in (0, 1))
    assert [p["id"] for p in first] != sorted(p["id"] for p in first)  # not in source order


def test_split_per_question_rejects_broken_conversations(tmp_path):
    broken = _conversation("q", "a")
    broken["conversations"].append({"from": "human", "value": "dangling"})
    with pytest.raises(DemoDataError, match="alternate human/gpt"):
        split_per_question(broken)
    with pytest.raises(DemoDataError, match="ct_train.json.*python -m finetune.demo_data"):
        write_per_question_records(tmp_path)


def test_demo_recipe_trains_a_few_steps(tmp_path):
    from finetune.train import run_training

    train_data = _tiny_training_data(tmp_path / "data")
    recipe = load_recipe("demo", [f"train_data={','.join(train_data)}", f"output_dir={tmp_path / 'run'}",
                                  f"image_cache_dir={tmp_path / 'cache'}", "max_steps=2", "logging_steps=1",
                                  "save_steps=1000"])
    summary = run_training(recipe)
    assert summary["global_step"] == 2
    assert summary["train_samples"] == sum(len(json.loads(Path(path).read_text())) for path in train_data)
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    saved = Path(summary["saved_to"])
    assert json.loads((saved / INFERENCE_DEFAULTS_FILE).read_text()) == {"render": recipe.render}
    assert LongLlavaConfig.from_pretrained(saved).to_dict()["text_config"]["hidden_size"] == 256


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
