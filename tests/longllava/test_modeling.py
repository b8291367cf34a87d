"""LongLlavaForConditionalGeneration on the tiny preset: pooling, forward/generate, errors, round trip."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from longllava import protocol
from longllava.errors import ModelInputError
from longllava.loading import build_model
from longllava.modeling import (
    LongLlavaForConditionalGeneration,
    TowerFeatureCache,
    pool_patch_grid,
    tower_digest,
)


def upstream_pool(features: torch.Tensor, out: int) -> torch.Tensor:
    """The upstream formula, one image at a time: (g*g, C) -> (C, g, g) -> bilinear -> (out*out, C)."""
    pooled = []
    for image in features:
        side = int(image.shape[0] ** 0.5)
        grid = image.T.reshape(image.shape[1], side, side)  # (C, g, g)
        resized = F.interpolate(grid[None], size=(out, out), mode="bilinear", align_corners=False)[0]
        pooled.append(resized.reshape(image.shape[1], out * out).T)
    return torch.stack(pooled)


def test_pooling_matches_upstream_formula_24_to_12():
    features = torch.randn(3, 24 * 24, 40)
    pooled = pool_patch_grid(features, 12)
    assert pooled.shape == (3, 144, 40)
    torch.testing.assert_close(pooled, upstream_pool(features, 12))
    # Independent check: halving with bilinear, align_corners=False, averages each 2x2 block.
    blocks = features.reshape(3, 12, 2, 12, 2, 40).mean(dim=(2, 4)).reshape(3, 144, 40)
    torch.testing.assert_close(pooled, blocks)


def test_pooling_keeps_row_major_token_order():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # token (r, c) holds 4r + c
    pooled = pool_patch_grid(grid, 2).flatten()
    torch.testing.assert_close(pooled, torch.tensor([2.5, 4.5, 10.5, 12.5]))


def test_image_features_are_clip_layer_minus_2_pooled_then_projected(tiny_model):
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        features = tiny_model.encode_images(pixels)
        hidden = tiny_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = tiny_model.model.multi_modal_projector(upstream_pool(hidden, 4))
    assert features.shape == (2, tiny_model.config.tokens_per_image, tiny_model.config.text_config.hidden_size)
    torch.testing.assert_close(features, expected)


def frozen_copy_with_cache(model, **cache_options):
    cached = copy.deepcopy(model)
    cached.model.vision_tower.requires_grad_(False)
    cached.model.tower_feature_cache = TowerFeatureCache(**cache_options)
    return cached


def test_tower_feature_cache_encodes_each_distinct_image_once(tiny_model):
    cached = frozen_copy_with_cache(tiny_model)
    calls = []
    tower_forward = cached.model.vision_tower.forward
    cached.model.vision_tower.forward = lambda pixels, **kw: calls.append(len(pixels)) or tower_forward(pixels, **kw)
    a, b, c = torch.randn(3, 3, 56, 56).unbind(0)
    with torch.no_grad():
        first = cached.encode_images(torch.stack([a, b, a]))  # a twice in one batch: encoded once
        second = cached.encode_images(torch.stack([c, b, a]))  # only c is new
        expected = tiny_model.encode_images(torch.stack([a, b, a, c, b, a]))
    assert calls == [2, 1]
    cache = cached.model.tower_feature_cache
    assert (cache.hits, cache.misses, len(cache)) == (3, 3, 3)
    torch.testing.assert_close(torch.cat([first, second]), expected)


def test_tower_feature_cache_gives_the_projector_the_same_gradients(tiny_model):
    cached = frozen_copy_with_cache(tiny_model)
    plain = copy.deepcopy(cached)
    plain.model.tower_feature_cache = None
    pixels = torch.randn(2, 3, 56, 56)
    cached.encode_images(pixels)  # fill the cache
    for model in (cached, plain):
        model.encode_images(pixels).square().sum().backward()
    for (name, cached_param), plain_param in zip(cached.model.multi_modal_projector.named_parameters(),
                                                 plain.model.multi_modal_projector.parameters()):
        torch.testing.assert_close(cached_param.grad, plain_param.grad, msg=name)


def test_tower_feature_cache_is_bypassed_while_the_tower_trains(tiny_model):
    cached = frozen_copy_with_cache(tiny_model)
    cached.model.vision_tower.encoder.layers[0].mlp.fc1.weight.requires_grad_(True)
    pixels = torch.randn(2, 3, 56, 56)
    cached.encode_images(pixels)
    cached.encode_images(pixels)
    assert (cached.model.tower_feature_cache.hits, cached.model.tower_feature_cache.misses) == (0, 0)


def test_tower_feature_cache_stops_storing_at_its_size_limit(tiny_model):
    per_image = tiny_model.config.tokens_per_image * tiny_model.config.vision_config.hidden_size * 4
    cached = frozen_copy_with_cache(tiny_model, max_bytes=2 * per_image)
    with torch.no_grad():
        features = cached.encode_images(torch.randn(3, 3, 56, 56))
    assert features.shape[0] == 3
    assert len(cached.model.tower_feature_cache) == 2
    assert cached.model.tower_feature_cache.stored_bytes == 2 * per_image


def test_tower_feature_cache_round_trips_through_a_file(tiny_model, tmp_path):
    cached = frozen_copy_with_cache(tiny_model)
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = cached.encode_images(pixels)
    cached.model.tower_feature_cache.save(tmp_path / "features.safetensors")
    reloaded = frozen_copy_with_cache(tiny_model)
    assert reloaded.model.tower_feature_cache.load(tmp_path / "features.safetensors") == 3
    reloaded.model.vision_tower.forward = None  # every image must come from the file
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_images(pixels), expected, rtol=0, atol=0)
    assert reloaded.model.tower_feature_cache.hits == 3


def test_tower_digest_changes_with_the_tower_weights(tiny_model):
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.model.vision_tower.encoder.layers[0].mlp.fc1.bias.add_(1e-6)
    assert tower_digest(tiny_model.model) == tower_digest(copy.deepcopy(tiny_model).model)
    assert tower_digest(tiny_model.model) != tower_digest(other.model)


def chat_inputs(processor, images, question="What is shown?"):
    prompt = protocol.images_prompt(len(images)) + question
    return processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, images=images)


@pytest.mark.parametrize("n_images", [1, 3, 50])
def test_forward_and_generate_with_many_images(tiny_model, tiny_processor, images_factory, n_images):
    inputs = chat_inputs(tiny_processor, images_factory(n_images))
    n_tokens = inputs["input_ids"].shape[1]
    assert int((inputs["input_ids"] == tiny_model.config.image_token_id).sum()) == 16 * n_images
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
        generated = tiny_model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, n_tokens, tiny_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    assert generated.shape == (1, n_tokens + 3)
    # Greedy generation continues with the argmax of the last prompt position.
    assert generated[0, n_tokens] == logits[0, -1].argmax()


def test_images_change_the_logits(tiny_model, tiny_processor, images_factory):
    first = chat_inputs(tiny_processor, images_factory(2, seed=1))
    second = chat_inputs(tiny_processor, images_factory(2, seed=2))
    assert torch.equal(first["input_ids"], second["input_ids"])
    with torch.no_grad():
        a, b = tiny_model(**first).logits, tiny_model(**second).logits
    assert not torch.allclose(a, b)


def test_placeholder_image_count_mismatch_raises_clear_error(tiny_model, tiny_processor, images_factory):
    inputs = chat_inputs(tiny_processor, images_factory(3))
    with pytest.raises(ModelInputError, match=r"48 <image> tokens .* but 2 images were given"):
        tiny_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:2])


def test_save_load_round_trip_gives_identical_logits(tiny_model, tiny_processor, images_factory, tmp_path):
    inputs = chat_inputs(tiny_processor, images_factory(2))
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, LongLlavaForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, tiny_model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_bf16_forward_matches_cpu(tiny_model, tiny_processor, images_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    inputs = chat_inputs(tiny_processor, images_factory(3))
    with torch.no_grad():
        expected = tiny_model(**inputs).logits
        gpu_model = LongLlavaForConditionalGeneration(tiny_model.config).to("cuda", torch.bfloat16).eval()
        gpu_model.load_state_dict(tiny_model.state_dict())
        on_gpu = {k: v.to("cuda") for k, v in inputs.items()}
        on_gpu["pixel_values"] = on_gpu["pixel_values"].to(torch.bfloat16)
        got = gpu_model(**on_gpu).logits.float().cpu()
        generated = gpu_model.generate(**on_gpu, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_pre_encoded_images_give_the_same_logits(tiny_model, tiny_processor, images_factory):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inputs = chat_inputs(tiny_processor, images_factory(3))
    with torch.no_grad():
        features = torch.cat([tiny_model.encode_images(p[None]) for p in inputs["pixel_values"]])  # one at a time
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}
        streamed = tiny_model(input_ids=inputs["input_ids"], mm_encoder_outputs=encoded).logits
        direct = tiny_model(**inputs).logits
    torch.testing.assert_close(streamed, direct)


def _mamba_memory(mixer, length: int = 48) -> float:
    """Relative change of a Mamba mixer's output at the last position when only the first input changes."""
    torch.manual_seed(1)
    inputs = torch.randn(1, length, mixer.hidden_size)
    changed = inputs.clone()
    changed[:, 0] += 3.0
    with torch.no_grad():
        last, last_changed = mixer(inputs)[0, -1], mixer(changed)[0, -1]
    return float((last - last_changed).norm() / last.norm())


def test_mamba_time_step_init_gives_the_mamba_layers_a_memory(tokenizer, tiny_config):
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    from longllava.modeling import MAMBA_DT_FLOOR, MAMBA_DT_RANGE, init_mamba_time_steps, inverse_softplus

    x = torch.tensor([1e-4, 1e-2, 0.5, 3.0], dtype=torch.float64)
    assert torch.allclose(F.softplus(inverse_softplus(x)), x)
    torch.manual_seed(0)
    plain = LongLlavaForConditionalGeneration(tiny_config)  # transformers' init: dt_proj.bias = 0
    initialised = copy.deepcopy(plain)
    n_mixers = init_mamba_time_steps(initialised, seed=0)
    assert n_mixers == sum(isinstance(m, JambaMambaMixer) for m in plain.modules()) > 0
    for (name, before), after in zip(plain.state_dict().items(), initialised.state_dict().values()):
        assert torch.equal(before, after) == ("dt_proj" not in name), name  # nothing else moves
    mixer = next(m for m in initialised.modules() if isinstance(m, JambaMambaMixer))
    dt = F.softplus(mixer.dt_proj.bias.double())
    assert dt.min() >= max(MAMBA_DT_RANGE[0], MAMBA_DT_FLOOR) * 0.999 and dt.max() <= MAMBA_DT_RANGE[1] * 1.001
    assert mixer.dt_proj.weight.abs().max() <= mixer.time_step_rank ** -0.5
    old_mixer = next(m for m in plain.modules() if isinstance(m, JambaMambaMixer))
    assert torch.all(old_mixer.dt_proj.bias == 0)
    # 47 tokens later: transformers' init has forgotten the first input, Mamba's init has not
    assert _mamba_memory(old_mixer) < 1e-6 < 1e-3 < _mamba_memory(mixer)
    built, _ = build_model("tiny", tokenizer, seed=0)
    assert F.softplus(next(m for m in built.modules() if isinstance(m, JambaMambaMixer)).dt_proj.bias).max() <= 0.1001
