"""Grid places (config.grid_places): which images are tiles of a protocol grid, and the row / column vectors
added to their tokens in forward and in the session's chunked prefill alike."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from longllava import protocol
from longllava.loading import load_model
from longllava.modeling import enable_grid_places, grid_image_places
from longllava.session import LongContextSession


def ids_of(processor, text: str) -> torch.Tensor:
    return processor.tokenizer(processor.expand_image_tokens(text), add_special_tokens=False,
                               return_tensors="pt")["input_ids"][0]


def places_of(processor, text: str) -> list[list[int]]:
    tokenizer = processor.tokenizer
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    separators = tokenizer.convert_tokens_to_ids([protocol.IMG_START, protocol.IMG_END])
    image_id = tokenizer.convert_tokens_to_ids(protocol.IMAGE_TOKEN)
    return grid_image_places(ids_of(processor, text), image_id, newline, separators).tolist()


@pytest.fixture(scope="module")
def placed_model(tiny_model, tiny_processor):
    model = copy.deepcopy(tiny_model)
    tokenizer = tiny_processor.tokenizer
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    enable_grid_places(model, 4, newline, tokenizer.convert_tokens_to_ids([protocol.IMG_START, protocol.IMG_END]),
                       norm=8.0, seed=3)
    return model.eval()


def test_grid_tiles_get_row_and_column_others_nothing(tiny_processor):
    grid = protocol.grid_prompt(2, 3)
    assert places_of(tiny_processor, "Look: " + grid + "\nWhere?") == [
        [0, 0], [1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert places_of(tiny_processor, protocol.grid_prompt(2, 2, thumbnail=False)) == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert places_of(tiny_processor, protocol.series_prompt(4)) == [[0, 0]] * 4
    assert places_of(tiny_processor, protocol.images_prompt(3) + "\n" + protocol.images_prompt(1)) == [[0, 0]] * 4
    # rows of unequal length are not a grid; text between two grids starts a new one
    assert places_of(tiny_processor, protocol.images_prompt(2) + "\n" + protocol.images_prompt(3)) == [[0, 0]] * 5
    two = protocol.grid_prompt(1, 2) + "\nand\n" + protocol.grid_prompt(2, 1)
    assert places_of(tiny_processor, two) == [[0, 0], [1, 1], [1, 2], [0, 0], [1, 1], [2, 1]]


def test_place_vectors_reach_only_grid_tiles(placed_model, tiny_processor, images_factory):
    body = placed_model.model
    table = body.grid_place_embeddings.detach()
    assert table.shape == (2, 4, placed_model.config.text_config.hidden_size)
    assert torch.allclose(table.norm(dim=-1), torch.full((2, 4), 8.0))
    features = torch.zeros(7, 3, table.shape[-1])
    placed = body.add_grid_places(features, ids_of(tiny_processor, protocol.grid_prompt(2, 3))[None])
    assert placed[0].abs().max() == 0  # the thumbnail
    assert torch.allclose(placed[6], (table[0, 1] + table[1, 2]).expand(3, -1))  # row 2, column 3
    series = body.add_grid_places(features[:4], ids_of(tiny_processor, protocol.series_prompt(4))[None])
    assert series.abs().max() == 0
    # past grid_places rows / columns share the last vectors
    wide = body.add_grid_places(torch.zeros(7, 1, table.shape[-1]), ids_of(tiny_processor, protocol.grid_prompt(1, 6))[None])
    assert torch.allclose(wide[6, 0], table[0, 0] + table[1, 3])


def test_forward_and_chunked_prefill_agree_with_places(placed_model, tiny_model, tiny_processor, images_factory):
    images = images_factory(7, seed=4)
    messages = [{"role": "user", "content": protocol.grid_prompt(2, 3) + "\nWhich column holds ships?"}]
    inputs = tiny_processor.apply_chat_template(messages, tokenize=True, images=images)
    with torch.no_grad():
        placed = placed_model(**inputs).logits
        plain = tiny_model(**inputs).logits
    assert (placed - plain).abs().max() > 1e-3  # the test can fail: the places change the answer's logits
    # pre-encoded features (mm_encoder_outputs) get the places once, however often they are passed
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=tuple(placed_model.encode_images(
        inputs["pixel_values"]).unbind(0)))}
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with torch.no_grad():
        for _ in range(2):
            assert (placed_model(**text_only, mm_encoder_outputs=encoded).logits - placed).abs().max() <= 1e-4
    session = LongContextSession(placed_model, tiny_processor, image_batch_size=3, chunk_tokens=11)
    prefilled = session.prefill(inputs["input_ids"], session.encode_images(images), all_logits=True).logits
    assert (prefilled - placed).abs().max() <= 1e-3


def test_grid_places_are_saved_and_loaded(placed_model, tiny_processor, tmp_path):
    placed_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert loaded.config.grid_places == 4 and loaded.config.grid_separator_ids == placed_model.config.grid_separator_ids
    assert torch.equal(loaded.model.grid_place_embeddings, placed_model.model.grid_place_embeddings)
    with pytest.raises(Exception, match="already has grid places"):
        enable_grid_places(loaded, 4, 0, [1, 2])


def test_grid_places_need_their_token_ids(tiny_config):
    with pytest.raises(ValueError, match="grid_newline_id"):
        type(tiny_config)(**{**tiny_config.to_dict(), "grid_places": 4})
