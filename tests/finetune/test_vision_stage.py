"""Stage ``vision``: labelled single images train the vision tower (only) through a linear head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import FinetuneError
from finetune.data import DataError
from finetune.train import read_loss_csv, run_training
from finetune.vision import (
    LabelledImageDataset,
    bag_logits,
    collate_bags,
    init_projector_from_head,
    label_logits,
    label_probabilities,
    label_vocabulary,
    label_weight_vector,
    load_head,
    load_labelled_images,
    multi_hot,
    token_targets,
)
from longllava.loading import load_model


def write_labelled_shapes(folder: Path, n: int = 24, seed: int = 0) -> Path:
    """``n`` grey noise images; those with a label carry a bright square in the left or right half."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        pixels = rng.integers(90, 130, (56, 56, 3)).astype(np.uint8)
        labels = []
        if i % 3:
            side = "left" if i % 3 == 1 else "right"
            x0 = 6 if side == "left" else 34
            pixels[20:36, x0:x0 + 16] = (250, 250, 40)
            labels = ["square", f"square {side}"]
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        records.append({"id": f"shape-{i}", "images": [f"img{i:02d}.png"], "labels": labels})
    path = folder / "vision.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory, make_recipe):
    data = write_labelled_shapes(tmp_path_factory.mktemp("shapes"))
    out = tmp_path_factory.mktemp("vision") / "run"
    recipe = make_recipe(data, out, mode="full", stage="vision", max_steps=24, save_steps=12, learning_rate=2e-3,
                         per_device_train_batch_size=8, logging_steps=1)
    return recipe, data, run_training(recipe)


def test_vision_stage_trains_only_the_vision_tower_and_learns_the_labels(vision_run):
    recipe, data, summary = vision_run
    assert summary["stage"] == "vision" and summary["global_step"] == 24 and summary["train_samples"] == 24
    model, processor = load_model(summary["saved_to"])
    base, _ = load_model(summary["base_model"])
    trained = dict(model.named_parameters())
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and all("vision_tower" in n for n in changed)
    head, vocabulary = load_head(model, recipe.output_dir)
    assert vocabulary == ["square", "square left", "square right"]
    records = load_labelled_images(data)
    probabilities = label_probabilities(head, records, processor.image_processor)
    truth = torch.stack([multi_hot(r.labels, vocabulary) for r in records])
    assert ((probabilities > 0.5) == truth.bool()).float().mean() > 0.9
    rows = read_loss_csv(f"{recipe.output_dir}/loss.csv")
    assert np.mean([r["loss"] for r in rows[-6:]]) < 0.7 * np.mean([r["loss"] for r in rows[:6]])


def test_vision_stage_rejects_bad_records_and_settings(tmp_path, make_recipe):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "a", "images": ["missing.png"], "labels": ["x"]}]))
    with pytest.raises(DataError, match="missing.png does not exist"):
        load_labelled_images(bad)
    bad.write_text(json.dumps([{"id": "a", "images": [], "labels": ["x"]}]))
    with pytest.raises(DataError, match="list of image paths"):
        load_labelled_images(bad)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    bad.write_text(json.dumps([{"id": "a", "images": ["x.png", "y.png"], "labels": ["x"]}]))
    with pytest.raises(DataError, match="y.png does not exist"):
        load_labelled_images(bad)
    bad.write_text(json.dumps([{"id": "a", "images": ["x.png"], "labels": "x"}]))
    with pytest.raises(DataError, match="list of label names"):
        load_labelled_images(bad)
    with pytest.raises(FinetuneError, match="set mode=full"):
        make_recipe(bad, tmp_path / "out", mode="lora", stage="vision")
    with pytest.raises(FinetuneError, match="gradient_checkpointing: false"):
        make_recipe(bad, tmp_path / "out", mode="full", stage="vision", gradient_checkpointing=True)


def test_projector_init_head_writes_the_label_maps_into_the_projector(vision_run, colour_set, tmp_path, make_recipe):
    recipe, data, summary = vision_run
    sft = make_recipe(colour_set, tmp_path / "sft", base_model=summary["saved_to"], mode="full", stage="sft",
                      projector_init_head=recipe.output_dir, projector_init_scale=0.5, max_steps=1,
                      learning_rate=1e-12, save_steps=1)
    model, processor = load_model(run_training(sft)["saved_to"])
    head, vocabulary = load_head(model, recipe.output_dir)
    first = model.model.multi_modal_projector.linear_1
    torch.testing.assert_close(first.weight[:3], 0.5 * head.head.weight, atol=1e-6, rtol=0)
    base, _ = load_model(summary["saved_to"])
    torch.testing.assert_close(first.weight[3:], base.model.multi_modal_projector.linear_1.weight[3:], atol=1e-6, rtol=0)
    # each image token's first hidden units are its label logits, scaled
    pixels = processor.image_processor([Image.open(r.image) for r in load_labelled_images(data)[:4]],
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = first(head.features(pixels))[..., :3]
        torch.testing.assert_close(hidden, 0.5 * head.token_logits(pixels), atol=1e-4, rtol=1e-4)


def test_projector_init_head_needs_a_full_text_stage_and_a_vision_run(vision_run, colour_set, tmp_path, make_recipe):
    recipe, _, summary = vision_run
    with pytest.raises(FinetuneError, match="set mode: full and stage sft"):
        make_recipe(colour_set, tmp_path / "a", mode="lora", projector_init_head=recipe.output_dir)
    with pytest.raises(FinetuneError, match="set mode: full and stage sft"):
        make_recipe(colour_set, tmp_path / "b", mode="full", stage="vision", projector_init_head=recipe.output_dir,
                    gradient_checkpointing=False)
    model, _ = load_model(summary["saved_to"])
    with pytest.raises(DataError, match="vision_head.safetensors is missing"):
        init_projector_from_head(model, tmp_path, 0.25)


def test_a_bag_pools_the_head_over_every_token_of_its_images(vision_run, tmp_path):
    recipe, data, summary = vision_run
    model, processor = load_model(summary["saved_to"])
    head, vocabulary = load_head(model, recipe.output_dir)
    singles = load_labelled_images(data)[:5]
    bags = tmp_path / "bags.json"
    bags.write_text(json.dumps([
        {"id": "bag-a", "images": [str(r.image) for r in singles[:3]], "labels": ["square"]},
        {"id": "one", "images": [str(singles[3].image)], "labels": []},
        {"id": "bag-b", "images": [str(r.image) for r in singles[3:5]], "labels": ["square", "square left"]},
    ]))
    records = load_labelled_images(bags)
    assert [len(r.images) for r in records] == [3, 1, 2]
    with pytest.raises(DataError, match="a bag of 3 images has no single image"):
        _ = records[0].image
    pixels = processor.image_processor([Image.open(r.image) for r in singles], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = head.token_logits(pixels)  # (5, t, L)
    expected = torch.stack([torch.logsumexp(tokens[i:j].flatten(0, 1), dim=0) - np.log(tokens[i:j].shape[0] * tokens.shape[1])
                            for i, j in ((0, 3), (3, 4), (3, 5))])
    torch.testing.assert_close(label_probabilities(head, records, processor.image_processor, batch_size=2),
                               torch.sigmoid(expected), atol=1e-5, rtol=1e-5)
    # a bag's pooled logits follow from its images' own pooled logits
    images = load_labelled_images(data)[:3]
    torch.testing.assert_close(bag_logits(label_logits(head, images, processor.image_processor)), expected[0],
                               atol=1e-5, rtol=1e-5)
    # a batch of single images pools per image, as without bags
    single_batch = collate_bags([{"pixel_values": pixels[i:i + 1], "labels": torch.zeros(3)} for i in range(5)])
    assert single_batch["bag_sizes"].tolist() == [1] * 5
    with torch.no_grad():
        torch.testing.assert_close(head(**single_batch)["logits"], head(pixels)["logits"], atol=0, rtol=0)
        with pytest.raises(ValueError, match="bag sizes add up to 4, but 5 images came"):
            head(pixels, bag_sizes=torch.tensor([2, 2]))


def square_cells(side: str, grid: int = 4) -> list[int]:
    """Cells of the tiny preset's 4 x 4 pooled grid (14 px each on 56 px) that the bright square of
    :func:`write_labelled_shapes` covers: rows 20-35 -> grid rows 1-2; columns 6-21 or 34-49."""
    columns = (0, 1) if side == "left" else (2, 3)
    return [row * grid + column for row in (1, 2) for column in columns]


def with_token_labels(path: Path) -> Path:
    """The shapes' records with per-token targets: every label's cells on the 4 x 4 grid."""
    records = json.loads(path.read_text())
    for record in records:
        side = next((name.split()[1] for name in record["labels"] if " " in name), None)
        cells = square_cells(side) if side else []
        record["token_grid"] = 4
        record["token_labels"] = {"square": cells, "square left": cells if side == "left" else [],
                                  "square right": cells if side == "right" else []}
    target = path.with_name("vision_tokens.json")
    target.write_text(json.dumps(records))
    return target


def test_token_targets_add_a_per_token_loss_over_the_named_labels(vision_run):
    recipe, data, summary = vision_run
    model, processor = load_model(summary["saved_to"])
    head, vocabulary = load_head(model, recipe.output_dir)
    records = load_labelled_images(with_token_labels(data))
    assert records[1].token_grid == 4 and records[1].token_labels["square left"] == tuple(square_cells("left"))
    items = [LabelledImageDataset(records[:4], vocabulary, processor.image_processor, token_grid=4)[i] for i in range(4)]
    batch = collate_bags(items)
    assert batch["token_targets"].shape == (4, 16, 3) and batch["token_mask"].all()
    assert batch["token_targets"][1, :, 1].nonzero().flatten().tolist() == square_cells("left")
    batch["token_mask"][:, 2] = False  # "square right": no token target
    head.token_loss_weight = 0.5
    with torch.no_grad():
        tokens = head.token_logits(batch["pixel_values"])  # (4, 16, 3)
        pooled = torch.logsumexp(tokens, dim=1) - np.log(16)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        expected = bce(pooled, batch["labels"]) + 0.5 * bce(tokens[..., :2], batch["token_targets"][..., :2])
        torch.testing.assert_close(head(**batch)["loss"], expected, atol=1e-6, rtol=1e-6)
        head.token_loss_weight = 0.0
        torch.testing.assert_close(head(**batch)["loss"], bce(pooled, batch["labels"]), atol=1e-6, rtol=1e-6)
    with pytest.raises(DataError, match="token_grid 4 is not the model's pooled grid 5"):
        token_targets(records[0], vocabulary, 5)


def test_label_weights_scale_their_labels_terms_in_both_losses(vision_run):
    recipe, data, summary = vision_run
    model, processor = load_model(summary["saved_to"])
    head, vocabulary = load_head(model, recipe.output_dir)
    assert vocabulary == ["square", "square left", "square right"]
    weights = label_weight_vector(vocabulary, {"square": 2.0, "square left": 5.0})  # the longest prefix wins
    assert weights.tolist() == [2.0, 5.0, 2.0]
    assert label_weight_vector(vocabulary, {}) is None
    with pytest.raises(DataError, match="prefix\\(es\\) 'circle' match no label"):
        label_weight_vector(vocabulary, {"circle": 3.0})
    records = load_labelled_images(with_token_labels(data))
    items = [LabelledImageDataset(records[:4], vocabulary, processor.image_processor, token_grid=4)[i] for i in range(4)]
    batch = collate_bags(items)
    head.token_loss_weight, head.label_weights = 0.5, weights
    with torch.no_grad():
        tokens = head.token_logits(batch["pixel_values"])  # (4, 16, 3)
        pooled = torch.logsumexp(tokens, dim=1) - np.log(16)
        terms = torch.nn.functional.binary_cross_entropy_with_logits  # elementwise below
        pooled_terms = terms(pooled, batch["labels"], reduction="none") * weights  # (4, 3)
        token_terms = terms(tokens, batch["token_targets"], reduction="none") * weights  # (4, 16, 3)
        expected = pooled_terms.mean() + 0.5 * token_terms.mean()
        torch.testing.assert_close(head(**batch)["loss"], expected, atol=1e-6, rtol=1e-6)


def test_vision_stage_with_token_targets_puts_the_evidence_in_the_square_s_tokens(tmp_path, make_recipe):
    data = with_token_labels(write_labelled_shapes(tmp_path / "shapes"))
    recipe = make_recipe(data, tmp_path / "run", mode="full", stage="vision", max_steps=24, save_steps=100,
                         learning_rate=2e-3, per_device_train_batch_size=8, vision_token_loss_weight=1.0)
    summary = run_training(recipe)
    model, processor = load_model(summary["saved_to"])
    head, vocabulary = load_head(model, recipe.output_dir)
    records = load_labelled_images(data)
    pixels = processor.image_processor([Image.open(r.image) for r in records], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        square = head.token_logits(pixels)[..., vocabulary.index("square")]  # (24, 16)
    inside = torch.zeros_like(square, dtype=torch.bool)
    for i, record in enumerate(records):
        inside[i, list(record.token_labels["square"])] = True
    # the square's own cells light up: a margin of 8.7 logits here, 1.2 without the token loss (same run, weight 0)
    assert square[inside].mean() > square[~inside].mean() + 4.0


def test_token_labels_are_checked_where_they_are_read(tmp_path, make_recipe):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    bad = tmp_path / "bad.json"
    for record, message in (
        ({"token_labels": {"x": [0]}}, "need 'token_grid'"),
        ({"token_labels": {"x": [9]}, "token_grid": 3}, r"cells 0..8 of the 3 x 3 grid"),
        ({"token_labels": ["x"], "token_grid": 3}, "must map label names"),
        ({"images": ["x.png", "x.png"], "token_labels": {"x": []}, "token_grid": 3}, "a bag of 2 images cannot"),
    ):
        bad.write_text(json.dumps([{"id": "a", "images": ["x.png"], "labels": ["x"], **record}]))
        with pytest.raises(DataError, match=message):
            load_labelled_images(bad)
    bad.write_text(json.dumps([{"id": "a", "images": ["x.png"], "labels": ["x"], "token_labels": {"y": [0]},
                                "token_grid": 3}]))
    assert label_vocabulary(load_labelled_images(bad)) == ["x", "y"]  # a token label is a label too
    with pytest.raises(DataError, match="token label 'y' is not in the head's vocabulary"):
        token_targets(load_labelled_images(bad)[0], ["x"], 3)
    with pytest.raises(FinetuneError, match="vision_token_loss_weight -1.0 must be 0"):
        make_recipe(bad, tmp_path / "out", mode="full", stage="vision", gradient_checkpointing=False,
                    vision_token_loss_weight=-1.0)
    for weights, message in (({"x": -1}, "map label-name prefixes to weights >= 0"), ([2.0], "must map label-name")):
        with pytest.raises(FinetuneError, match=message):
            make_recipe(bad, tmp_path / "out", mode="full", stage="vision", gradient_checkpointing=False,
                        vision_label_weights=weights)
    with pytest.raises(FinetuneError, match="apply to stage 'vision' only"):
        make_recipe(bad, tmp_path / "out", mode="lora", stage="sft", vision_label_weights={"x": 2.0})
