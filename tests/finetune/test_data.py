"""Conversation records -> tokens/labels, image expansion, packing and the collator."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune import data
from finetune.data import IGNORE_INDEX, ConversationEncoder, DataError, EncodedSample
from longllava import protocol


def _record(tmp_path: Path, raw: dict) -> data.TrainingRecord:
    return data.parse_record(raw, "test[0]", tmp_path)


def _png(path: Path, colour=(10, 20, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", (56, 56), colour).save(path)
    return path


def test_concat_samples_hand_checked():
    # Two samples as the encoder produces them: <bos> prompt ... answer <eos>; labels only on answers.
    a = EncodedSample("a", [1, 3, 40, 41, 1, 4, 50, 2], [-100, -100, -100, -100, -100, -100, 50, 2], [])
    b = EncodedSample("b", [1, 3, 6, 6, 1, 4, 60, 61, 2], [-100] * 6 + [60, 61, 2], [Path("x.png")])
    packed = data.concat_samples([a, b])
    assert packed["input_ids"] == [1, 3, 40, 41, 1, 4, 50, 2, 1, 3, 6, 6, 1, 4, 60, 61, 2]
    assert packed["labels"] == [-100] * 6 + [50, 2] + [-100] * 6 + [60, 61, 2]
    assert packed["position_ids"] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert packed["sample_lengths"] == [8, 9]
    assert packed["image_paths"] == [Path("x.png")]
    # The causal shift: token t+1 is predicted at t. Sample b's first token (<bos>, index 8) is never a
    # target, so sample a's last position (its <eos>) is not trained to predict sample b.
    shifted = packed["labels"][1:]
    assert shifted[7] == IGNORE_INDEX
    targets = [(i, label) for i, label in enumerate(packed["labels"]) if label != IGNORE_INDEX]
    assert targets == [(6, 50), (7, 2), (14, 60), (15, 61), (16, 2)]


def test_pack_lengths_next_fit():
    assert data.pack_lengths([5, 4, 3, 8, 1], 9) == [[0, 1], [2], [3, 4]]
    with pytest.raises(DataError, match="max_length"):
        data.pack_lengths([10], 9)


def test_encoder_labels_cover_only_answers(tmp_path, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    encoder = ConversationEncoder(tokenizer, tokens_per_image=16)
    image = _png(tmp_path / "a.png")
    record = _record(tmp_path, {"id": "r", "image": image.name, "conversations": [
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes, blue."}]})
    sample = encoder.encode(record, data.record_visuals(record))
    assert sample.input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 16
    supervised = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "Blue.<|endoftext|>Yes, blue.<|endoftext|>"
    # everything decodes back to the chat template with the protocol's image block
    text = tokenizer.decode([t for t in sample.input_ids])
    expected = protocol.render_prompt([{"role": "user", "content": protocol.image_block() + "\nWhat colour?"},
                                       {"role": "assistant", "content": "Blue."},
                                       {"role": "user", "content": "Sure?"},
                                       {"role": "assistant", "content": "Yes, blue."}], add_generation_prompt=False)
    assert text == expected.replace("<image>", "<image>" * 16)


def test_packed_dataset_keeps_labels_aligned(tmp_path, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    encoder = ConversationEncoder(tokenizer, tokens_per_image=16, max_length=120)
    records = []
    for i, answer in enumerate(["Red.", "Green.", "Blue."]):
        _png(tmp_path / f"{i}.png", (50 * i, 0, 0))
        records.append(_record(tmp_path, {"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": answer}]}))
    samples = data.encode_records(records, encoder)
    loader = data.processor_image_loader(tiny_processor.image_processor)
    budget = len(samples[0]) + len(samples[1])  # room for two samples, not three
    dataset = data.ConversationDataset(samples, loader, max_length=budget, pack=True)
    assert len(dataset) == 2 and dataset.groups == [[0, 1], [2]]
    item = dataset[0]
    assert item["pixel_values"].shape == (2, 3, 56, 56)
    n0 = len(samples[0])
    assert item["input_ids"].tolist() == samples[0].input_ids + samples[1].input_ids
    assert item["position_ids"][n0].item() == 0 and item["labels"][n0].item() == IGNORE_INDEX
    supervised = [tokenizer.decode(item["input_ids"][item["labels"] != IGNORE_INDEX].tolist())]
    assert supervised == ["Red.<|endoftext|>Green.<|endoftext|>"]


def test_collator_pads_and_concatenates_images():
    collate = data.Collator(pad_token_id=0)
    features = [
        {"input_ids": torch.tensor([1, 5, 2]), "labels": torch.tensor([-100, 5, 2]),
         "position_ids": torch.tensor([0, 1, 2]), "pixel_values": torch.ones(2, 3, 4, 4)},
        {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "position_ids": torch.tensor([0, 1]),
         "pixel_values": torch.zeros(1, 3, 4, 4)},
    ]
    batch = collate(features)
    assert batch["input_ids"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 2], [-100, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["pixel_values"][2].sum() == 0


def test_visual_prompt_placement(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    images = [f"{i}.png" for i in range(3)]
    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    series = _record(tmp_path, {"images": images, "layout": "series", "conversations": conv})
    messages = data.to_messages(series, data.record_visuals(series))
    assert messages[0]["content"] == protocol.series_prompt(3) + "\nQ"
    marked = _record(tmp_path, {"images": images, "layout": "series", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]})
    assert data.to_messages(marked, data.record_visuals(marked))[0]["content"] == protocol.series_prompt(3) + "\nQ"
    grid = _record(tmp_path, {"images": images[:3], "layout": "grid", "grid": [1, 2], "conversations": conv})
    assert data.to_messages(grid, data.record_visuals(grid))[0]["content"].startswith(protocol.grid_prompt(1, 2))
    wrong = _record(tmp_path, {"images": images, "conversations": [
        {"from": "human", "value": "<image> <image> Q"}, {"from": "gpt", "value": "A"}]})
    with pytest.raises(DataError, match="2 <image> placeholders for 3 images"):
        data.to_messages(wrong, data.record_visuals(wrong))


def test_bad_records_raise_with_location(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "missing.png", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}) + "\n")
    record = data.load_records(path)[0]
    with pytest.raises(DataError, match=r"bad.jsonl:1: image .*missing.png not found"):
        data.record_visuals(record)
    with pytest.raises(DataError, match="unknown layout"):
        _record(tmp_path, {"layout": "mosaic", "conversations": [{"from": "human", "value": "Q"}]})
    with pytest.raises(DataError, match="from"):
        _record(tmp_path, {"conversations": [{"from": "robot", "value": "Q"}]})
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        data.load_records(path)


class _GreedyTokenizer:
    """Longest-match tokenizer whose vocabulary merges across a turn boundary ("\\nB")."""

    chat_template = None
    unk_token_id = 0
    specials = ["<|startoftext|>", "<|endoftext|>", "<|User|>", "<|Assistant|>", "<image>"]

    def __init__(self) -> None:
        self.vocab = {tok: i + 1 for i, tok in enumerate(self.specials + ["\nB"])}
        for ch in "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.?":
            self.vocab.setdefault(ch, len(self.vocab) + 1)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids, i = [], 0
        while i < len(text):
            match = max((t for t in self.vocab if text.startswith(t, i)), key=len)
            ids.append(self.vocab[match])
            i += len(match)
        return {"input_ids": ids}


def test_inconsistent_tokenization_raises(tmp_path):
    encoder = ConversationEncoder(_GreedyTokenizer(), tokens_per_image=2)
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Blue."}]
    with pytest.raises(DataError, match="merge across a turn boundary"):
        encoder.encode_messages(messages, "rec-7")
    ids, labels = encoder.encode_messages([{"role": "user", "content": "Q?"},
                                           {"role": "assistant", "content": "red."}], "rec-8")
    assert [i for i, label in zip(ids, labels) if label != IGNORE_INDEX] == ids[-5:]


def test_ct_and_raster_records_render_once_into_cache(tmp_path, synthetic_sets, monkeypatch):
    records = data.load_records(synthetic_sets / "ct_train.json", render_defaults={"num_slices": 3, "size": 56})
    records += data.load_records(synthetic_sets / "rs_train.json", render_defaults={"tile_size": 56, "max_tiles": 4})
    ct, scene = records[0], records[2]
    assert ct.ct is not None and ct.layout == "series" and scene.raster is not None and scene.layout == "grid"
    ct_visuals = data.record_visuals(ct, tmp_path / "cache")
    assert len(ct_visuals.paths) == 3 and ct_visuals.prompt == protocol.series_prompt(3)
    scene_visuals = data.record_visuals(scene, tmp_path / "cache")
    assert scene_visuals.prompt.count("<image>") == len(scene_visuals.paths) == 5  # thumbnail + 2x2 (coarser level)

    def fail(record):
        raise AssertionError("re-rendered although cached")

    monkeypatch.setattr(data, "_render_ct", fail)
    monkeypatch.setattr(data, "_render_raster", fail)
    assert data.record_visuals(ct, tmp_path / "cache") == ct_visuals
    assert data.record_visuals(scene, tmp_path / "cache") == scene_visuals


def test_a_writer_that_loses_the_cache_race_reads_the_winners_rendering(tmp_path, synthetic_sets, monkeypatch):
    """Two processes sharing a cache render the same study at once: the one whose move comes second must
    not fail (it did: 'Directory not empty') nor leave its temporary folder behind."""
    ct = data.load_records(synthetic_sets / "ct_train.json", render_defaults={"num_slices": 3, "size": 56})[0]
    winner = data.record_visuals(ct, tmp_path / "cache")
    read_cache, misses = data._read_cache, []

    def miss_once(folder):  # the loser looked before the winner's folder was in place
        if not misses:
            misses.append(folder)
            return None
        return read_cache(folder)

    monkeypatch.setattr(data, "_read_cache", miss_once)
    assert data.record_visuals(ct, tmp_path / "cache") == winner and misses
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [winner.paths[0].parent.name]


def test_cache_is_keyed_by_the_options_each_renderer_reads(tmp_path, synthetic_sets, monkeypatch):
    render = {"num_slices": 3, "size": 56, "tile_size": 56, "max_tiles": 4}
    ct = data.load_records(synthetic_sets / "ct_train.json", render_defaults=render)[0]
    scene = data.load_records(synthetic_sets / "rs_train.json", render_defaults=render)[0]
    ct_visuals, scene_visuals = data.record_visuals(ct, tmp_path / "c"), data.record_visuals(scene, tmp_path / "c")
    assert set(data.render_options(scene)) == {"tile_size", "max_tiles"}

    def fail(record):
        raise AssertionError("re-rendered for an option its renderer does not read")

    monkeypatch.setattr(data, "_render_ct", fail)
    monkeypatch.setattr(data, "_render_raster", fail)
    # a CT-only option leaves the scene's tiles cached, a tiling option the CT slices
    assert data.record_visuals(replace(scene, render={**scene.render, "window": "slab"}), tmp_path / "c") == scene_visuals
    assert data.record_visuals(replace(ct, render={**ct.render, "max_tiles": 9}), tmp_path / "c") == ct_visuals
    with pytest.raises(AssertionError, match="re-rendered"):  # an option it reads does re-render
        data.record_visuals(replace(ct, render={**ct.render, "window": "slab"}), tmp_path / "c")
    # tile_labels: false is the cached rendering without labels; true renders the labelled prompt
    unlabelled = replace(scene, render={**scene.render, "tile_labels": False})
    assert data.record_visuals(unlabelled, tmp_path / "c") == scene_visuals
    monkeypatch.undo()
    labelled = data.record_visuals(replace(scene, render={**scene.render, "tile_labels": True}), tmp_path / "c")
    assert labelled.prompt == protocol.grid_prompt(2, 2, tile_labels=True)
    assert labelled.paths != scene_visuals.paths and scene_visuals.prompt == protocol.grid_prompt(2, 2)


def test_replay_mix_is_seeded_and_sized():
    main = [data.TrainingRecord(f"m{i}", ()) for i in range(10)]
    replay = [data.TrainingRecord(f"r{i}", ()) for i in range(3)]
    mixed = data.mix_with_replay(main, replay, 0.5, seed=1)
    assert len(mixed) == 15 and sum(r.id.startswith("r") for r in mixed) == 5
    assert [r.id for r in mixed] == [r.id for r in data.mix_with_replay(main, replay, 0.5, seed=1)]
    with pytest.raises(DataError, match="no replay data"):
        data.mix_with_replay(main, [], 0.5, seed=1)
