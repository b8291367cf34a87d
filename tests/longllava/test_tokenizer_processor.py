"""build_tokenizer (deterministic BPE with the protocol's special tokens) and LongLlavaProcessor."""

from __future__ import annotations

import pytest
import torch

from longllava import protocol
from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError
from longllava.loading import load_processor
from longllava.processor import LongLlavaProcessor, build_chat_inputs
from longllava.tokenizer import ALL_SPECIAL_TOKENS, build_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a radiology assistant."},
    {"role": "user", "content": protocol.series_prompt(2) + "Is there a pleural effusion?"},
    {"role": "assistant", "content": "No."},
    {"role": "user", "content": "And cardiomegaly?"},
]


def test_tokenizer_is_deterministic_and_has_fixed_special_ids(tokenizer):
    again = build_tokenizer(vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert [tokenizer.convert_tokens_to_ids(t) for t in ALL_SPECIAL_TOKENS] == list(range(12))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_special_tokens_are_single_ids_and_text_round_trips(tokenizer):
    text = protocol.grid_prompt(1, 2) + " A ship near the harbor; no pleural effusion.\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:4] == [7, 6, 8, tokenizer.convert_tokens_to_ids("\u010a")]  # <img><image></img>\n
    assert tokenizer.decode(ids) == text


def test_default_corpus_gives_whole_word_tokens_for_domain_words():
    tokenizer = build_tokenizer()
    for word in [" effusion", " harbor", " airplanes", " consolidation", " the"]:
        assert len(tokenizer.tokenize(word)) <= 2, word


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_conversation_equals_tokenizer_chat_template(tokenizer, add_generation_prompt):
    rendered = "".join(s.text for s in protocol.render_conversation(MESSAGES, add_generation_prompt))
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert expected.startswith("<|startoftext|><|System|>\nYou are a radiology assistant.\n<|startoftext|><|User|>\n")


def test_processor_expands_each_image_to_tokens_per_image(tiny_processor, images_factory):
    images = images_factory(3)
    inputs = tiny_processor(text=protocol.images_prompt(3) + "Describe.", images=images)
    ids = inputs["input_ids"][0]
    assert inputs["pixel_values"].shape == (3, 3, 56, 56)
    assert int((ids == 6).sum()) == 3 * 16
    # Each image block is <img>, 16 x <image>, </img>.
    first_block = ids[: 16 + 2].tolist()
    assert first_block == [7] + [6] * 16 + [8]


def test_processor_token_count_follows_preset(tokenizer, images_factory):
    config = LongLlavaConfig.from_preset("9b")
    processor = LongLlavaProcessor.from_config(config, tokenizer)
    inputs = processor(text=protocol.images_prompt(2), images=images_factory(2))
    assert int((inputs["input_ids"] == 6).sum()) == 2 * 144
    assert inputs["pixel_values"].shape == (2, 3, 336, 336)


def test_processor_placeholder_mismatch_is_user_error(tiny_processor, images_factory):
    with pytest.raises(ModelInputError, match="3 <image> placeholders but 2 images"):
        tiny_processor(text=protocol.images_prompt(3), images=images_factory(2))
    with pytest.raises(ModelInputError, match="0 <image> placeholders but 1 images"):
        tiny_processor(text="no placeholder", images=images_factory(1))


def test_chat_inputs_with_image_parts_and_placeholders_agree(tiny_processor, images_factory):
    images = images_factory(2)
    with_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]}]
    with_text = [{"role": "user", "content": protocol.images_prompt(2) + "Q"}]
    a = build_chat_inputs(tiny_processor, with_parts, images)
    b = build_chat_inputs(tiny_processor, with_text, images)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    prompt = tiny_processor.decode(a["input_ids"][0], skip_special_tokens=False)
    assert prompt.endswith("Q\n<|startoftext|><|Assistant|>\n")


def test_processor_save_load_round_trip(tiny_processor, tiny_model_dir, images_factory):
    images = images_factory(2)
    from transformers import AutoProcessor

    loaded = load_processor(tiny_model_dir)
    assert loaded.tokens_per_image == 16 and loaded.chat_template == protocol.CHAT_TEMPLATE
    assert isinstance(AutoProcessor.from_pretrained(tiny_model_dir), LongLlavaProcessor)
    a = tiny_processor(text=protocol.images_prompt(2), images=images)
    b = loaded(text=protocol.images_prompt(2), images=images)
    assert torch.equal(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def test_non_square_images_are_padded_not_cropped(tiny_processor):
    from PIL import Image

    # A wide image: red left half, blue right half. Centre-cropping would lose the outer columns;
    # padding keeps both colours and adds CLIP-mean bands on top and bottom.
    wide = Image.new("RGB", (112, 56), (255, 0, 0))
    wide.paste((0, 0, 255), (56, 0, 112, 56))
    pixels = tiny_processor(text=protocol.images_prompt(1), images=[wide])["pixel_values"][0]
    mean = torch.tensor(tiny_processor.image_processor.image_mean)
    std = torch.tensor(tiny_processor.image_processor.image_std)
    rgb = pixels * std[:, None, None] + mean[:, None, None]  # back to [0, 1]
    assert rgb.shape == (3, 56, 56)
    torch.testing.assert_close(rgb[:, 2, 28], mean, atol=0.02, rtol=0)  # top band: mean colour
    torch.testing.assert_close(rgb[:, 28, 2], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)  # left edge red
    torch.testing.assert_close(rgb[:, 28, 53], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)  # right edge blue
