"""LongContextSession: chunked prefill equals a one-shot forward; cached decoding equals uncached."""

from __future__ import annotations

import copy

import pytest
import torch

from longllava import protocol, scan
from longllava.errors import ModelInputError
from longllava.session import LongContextSession


@pytest.fixture(scope="module")
def strong_model(tiny_model):
    """The tiny model with O(1) Mamba weights, so a dropped SSM state changes the logits visibly."""
    model = copy.deepcopy(tiny_model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mamba." in name and parameter.dim() == 2 and "A_log" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.4)
    return model.eval()


def prompt_for(n_images: int) -> list[dict]:
    return [{"role": "user", "content": protocol.images_prompt(n_images) + "\nDescribe the images."}]


def one_shot_logits(model, processor, messages, images) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = processor.apply_chat_template(messages, tokenize=True, images=images)
    with torch.no_grad():
        logits = model(**inputs).logits
    return inputs["input_ids"], logits


def test_chunked_prefill_equals_one_shot(strong_model, tiny_processor, images_factory):
    images = images_factory(5, seed=1)
    messages = prompt_for(5)
    input_ids, expected = one_shot_logits(strong_model, tiny_processor, messages, images)
    session = LongContextSession(strong_model, tiny_processor, image_batch_size=2, chunk_tokens=7)
    features = session.encode_images(images)
    result = session.prefill(input_ids, features, all_logits=True)
    assert session.stats.prefill_chunks == -(-input_ids.shape[1] // 7) > 10
    assert session.stats.image_batches == 3
    assert result.logits.shape == expected.shape
    assert (result.logits - expected).abs().max() <= 1e-3
    # the test can fail: without the hook's initial state, chunks after the first diverge
    scan.uninstall_fast_scan()
    try:
        diverged = session.prefill(input_ids, features, all_logits=True).logits
    finally:
        scan.install_fast_scan()
    assert (diverged - expected).abs().max() > 1e-2


def test_batched_encoding_equals_one_batch(tiny_model, tiny_processor, images_factory):
    images = images_factory(5, seed=2)
    seen_batches = []
    session = LongContextSession(tiny_model, tiny_processor, image_batch_size=2)
    original = session._encode_batch
    session._encode_batch = lambda batch: (seen_batches.append(len(batch)), original(batch))[1]
    streamed = session.encode_images(image for image in images)  # a generator: consumed lazily
    with torch.no_grad():
        at_once = tiny_model.encode_images(tiny_processor.preprocess_images(images))
    assert seen_batches == [2, 2, 1]
    assert torch.allclose(streamed, at_once, atol=1e-5)


def greedy_without_cache(model, processor, messages, images, n_new: int) -> list[int]:
    inputs = processor.apply_chat_template(messages, tokenize=True, images=images)
    ids = inputs["input_ids"]
    new = []
    for _ in range(n_new):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits
        next_id = int(logits[0, -1].argmax())
        if next_id == model.generation_config.eos_token_id:
            break
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new


def test_generation_with_cache_equals_without_cache(strong_model, tiny_processor, images_factory):
    images = images_factory(3, seed=3)
    messages = prompt_for(3)
    session = LongContextSession(strong_model, tiny_processor, image_batch_size=2, chunk_tokens=16)
    features = session.encode_images(images)
    prefilled = session.prefill(session.tokenize(messages), features)
    cached = session.decode_ids(prefilled, max_new_tokens=8)
    assert cached == greedy_without_cache(strong_model, tiny_processor, messages, images, 8)
    assert len(cached) > 0


def test_stream_progress_and_text(strong_model, tiny_processor, images_factory):
    images = images_factory(4, seed=4)
    events = []
    session = LongContextSession(
        strong_model, tiny_processor, image_batch_size=3, chunk_tokens=20,
        progress=lambda done, total, what: events.append((what.split()[0], done, total)),
    )
    pieces = list(session.generate(prompt_for(4), images, max_new_tokens=6, stream=True))
    answer = session.generate(prompt_for(4), images, max_new_tokens=6)
    assert "".join(pieces) == answer
    ids = greedy_without_cache(strong_model, tiny_processor, prompt_for(4), images, 6)
    assert ids
    assert answer == tiny_processor.tokenizer.decode(ids, skip_special_tokens=True)
    encoding = [e for e in events if e[0] == "encoding"]
    prefill = [e for e in events if e[0] == "prefill"]
    assert encoding[:3] == [("encoding", 0, 4), ("encoding", 3, 4), ("encoding", 4, 4)]
    assert prefill[-1][1] == prefill[-1][2] == session.stats.prefill_chunks > 1
    assert session.stats.n_images == 4 and session.stats.prompt_tokens > 4 * 16


def test_precomputed_features_answer_like_images(strong_model, tiny_processor, images_factory):
    images = images_factory(3, seed=8)
    session = LongContextSession(strong_model, tiny_processor, image_batch_size=2, chunk_tokens=16)
    features = session.encode_images(images)
    assert session.generate(prompt_for(3), image_features=features, max_new_tokens=6) == session.generate(
        prompt_for(3), images, max_new_tokens=6)
    with pytest.raises(ModelInputError, match="3 <image> placeholders but 2 images"):
        session.generate(prompt_for(3), image_features=features[:2], max_new_tokens=2)
    with pytest.raises(ModelInputError, match="not both"):
        session.generate(prompt_for(3), images, image_features=features, max_new_tokens=2)


def test_text_only_prompt_and_raw_string(tiny_model, tiny_processor):
    session = LongContextSession(tiny_model, tiny_processor)
    rendered = protocol.render_prompt([{"role": "user", "content": "Hello"}])
    assert session.generate(rendered, max_new_tokens=3) == session.generate(
        [{"role": "user", "content": "Hello"}], max_new_tokens=3
    )


def test_image_count_mismatch_is_a_clear_error(tiny_model, tiny_processor, images_factory):
    session = LongContextSession(tiny_model, tiny_processor)
    with pytest.raises(ModelInputError, match="2 <image> placeholders but 1 images"):
        session.generate(prompt_for(2), images_factory(1), max_new_tokens=2)
    features = session.encode_images(images_factory(1))
    with pytest.raises(ModelInputError, match="image tokens"):
        session.prefill(session.tokenize(prompt_for(2)), features)
    with pytest.raises(ModelInputError, match="must be positive"):
        LongContextSession(tiny_model, tiny_processor, chunk_tokens=0)
