"""The paper's prompt protocol (longllava/protocol.py): multi-image, series, grid, conversation rendering."""

from __future__ import annotations

import pytest

from longllava import protocol

BLOCK = "<img><image></img>"


def test_multi_image_prompt():
    assert protocol.images_prompt(1) == BLOCK
    assert protocol.images_prompt(3) == BLOCK * 3
    assert protocol.count_images(protocol.images_prompt(7)) == 7


def test_series_prompt():
    assert protocol.series_prompt(1) == f"<vid>{BLOCK}</vid>"
    assert protocol.series_prompt(3) == f"<vid>{BLOCK}<t>{BLOCK}<t>{BLOCK}</vid>"


def test_grid_prompt_thumbnail_then_rows():
    assert protocol.grid_prompt(2, 3) == f"{BLOCK}\n{BLOCK * 3}\n{BLOCK * 3}"
    assert protocol.grid_prompt(2, 2, thumbnail=False) == f"{BLOCK * 2}\n{BLOCK * 2}"
    assert protocol.visual_prompt("grid", 7, grid=(2, 3)) == protocol.grid_prompt(2, 3)
    assert protocol.visual_prompt("grid", 6, grid=(2, 3)) == protocol.grid_prompt(2, 3, thumbnail=False)
    assert protocol.visual_prompt("series", 2) == protocol.series_prompt(2)


def test_tile_labels_write_each_tiles_place_before_it():
    assert protocol.grid_prompt(2, 2, tile_labels=True) == (
        f"{BLOCK}\n(1,1){BLOCK}(1,2){BLOCK}\n(2,1){BLOCK}(2,2){BLOCK}")
    labelled = protocol.visual_prompt("grid", 7, grid=(2, 3), tile_labels=True)
    assert labelled == protocol.grid_prompt(2, 3, tile_labels=True)
    assert protocol.count_images(labelled) == 7
    assert labelled.startswith(BLOCK + "\n(1,1)")  # none on the thumbnail
    assert labelled.count("(") == 6 and f"{protocol.tile_label(2, 3)}{BLOCK}" in labelled  # one per tile


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: protocol.images_prompt(0), "number of images"),
        (lambda: protocol.grid_prompt(0, 2), "grid rows"),
        (lambda: protocol.visual_prompt("grid", 5, grid=(2, 3)), "needs 6 tiles"),
        (lambda: protocol.visual_prompt("mosaic", 1), "unknown layout"),
    ],
)
def test_bad_protocol_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_render_conversation_marks_only_answers_as_targets():
    messages = [
        {"role": "user", "content": BLOCK + "What is it?"},
        {"role": "assistant", "content": "A ship."},
    ]
    segments = protocol.render_conversation(messages)
    assert [s.is_target for s in segments] == [False, False, True]
    assert segments[-1].text == "A ship.<|endoftext|>"
    assert "".join(s.text for s in segments) == (
        f"<|startoftext|><|User|>\n{BLOCK}What is it?\n<|startoftext|><|Assistant|>\nA ship.<|endoftext|>"
    )
    with pytest.raises(ValueError, match="unknown role"):
        protocol.render_conversation([{"role": "bot", "content": "x"}])
