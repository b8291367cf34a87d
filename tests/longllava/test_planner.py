"""The memory planner's arithmetic, checked against bytes measured on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from longllava import protocol
from longllava.cli import main
from longllava.errors import ModelInputError
from longllava.planner import (
    kv_cache_bytes,
    mamba_state_bytes,
    measure_cache_bytes,
    plan_memory,
    weight_bytes,
)


def prefill_cache(model, processor, images, chunks=1):
    """Run the prompt through the model (optionally in chunks carrying the cache); return cache and length."""
    inputs = processor(text=protocol.images_prompt(len(images)) + "Describe.", images=images)
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.encode_images(inputs["pixel_values"].to(model.dtype))
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        cache = None
        bounds = torch.linspace(0, ids.shape[1], chunks + 1).long().tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            out = model.model.language_model(inputs_embeds=embeds[:, start:end], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    return cache, ids.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_and_mamba_state_match_measured_cache(tiny_model, tiny_processor, images_factory, dtype):
    model = tiny_model if dtype == torch.float32 else tiny_model.to(dtype)
    try:
        cache, n_tokens = prefill_cache(model, tiny_processor, images_factory(3))
        measured = measure_cache_bytes(cache)
        value_bytes = torch.tensor([], dtype=dtype).element_size()
        assert measured["kv_cache_bytes"] == kv_cache_bytes(model.config, n_tokens, value_bytes)
        assert measured["mamba_state_bytes"] == mamba_state_bytes(model.config, value_bytes)
        assert measured["kv_cache_bytes"] > 0 and measured["mamba_state_bytes"] > 0
    finally:
        tiny_model.to(torch.float32)


def test_mamba_state_is_flat_and_kv_linear_in_images(tiny_model, tiny_processor, images_factory):
    few, few_tokens = prefill_cache(tiny_model, tiny_processor, images_factory(2))
    many, many_tokens = prefill_cache(tiny_model, tiny_processor, images_factory(20), chunks=3)
    few_bytes, many_bytes = measure_cache_bytes(few), measure_cache_bytes(many)
    assert few_bytes["mamba_state_bytes"] == many_bytes["mamba_state_bytes"]
    per_token = kv_cache_bytes(tiny_model.config, 1, 4)
    assert many_bytes["kv_cache_bytes"] - few_bytes["kv_cache_bytes"] == per_token * (many_tokens - few_tokens)
    assert many_tokens - few_tokens == 18 * (tiny_model.config.tokens_per_image + 2)  # <img> + tokens + </img>


def test_weight_bytes_match_the_parameters(tiny_model):
    measured = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert weight_bytes(tiny_model.config, "fp32") == measured
    assert weight_bytes(tiny_model.config, "bf16") == measured // 2
    int8 = weight_bytes(tiny_model.config, "int8")
    assert measured // 4 < int8 < measured // 2


def test_9b_plan_numbers():
    plan = plan_memory("9b", gpu_gb=80, dtype="bf16", images=1000)
    assert plan.weights_bytes == 2 * 9_615_177_600
    # 4 attention layers x (K, V) x 8 kv heads x 128 dims x 2 bytes per token
    assert plan.kv_cache_bytes == 4 * 2 * 8 * 128 * 2 * plan.tokens
    assert plan.tokens == 1000 * 144 + 512 + 512
    # 28 Mamba layers x 8192 channels x (conv 4 x 2 bytes + fp32 state 16 x 4 bytes)
    assert plan.mamba_state_bytes == 28 * 8192 * (4 * 2 + 16 * 4)
    assert plan.fits and plan.max_images == plan.max_images_context == (262144 - 1024) // 144
    total = plan.weights_bytes + plan.kv_cache_bytes + plan.mamba_state_bytes
    assert plan.total_bytes == total + plan.activation_peak_bytes + plan.overhead_bytes


def test_max_images_is_the_largest_count_that_fits():
    plan = plan_memory("a13b", gpu_gb=80, dtype="int8", images=100, chunk_size=None)
    assert plan.limited_by == "GPU memory"
    n = plan.max_images_memory
    assert plan_memory("a13b", 80, "int8", images=n, chunk_size=None).total_bytes <= 80e9
    assert plan_memory("a13b", 80, "int8", images=n + 1, chunk_size=None).total_bytes > 80e9
    chunked = plan_memory("a13b", gpu_gb=80, dtype="int8", images=100)
    assert chunked.max_images_memory > n  # chunked prefill keeps the activation peak flat
    assert plan_memory("a13b", gpu_gb=80, dtype="bf16").max_images == 0


def test_plan_cli_json_prints_max_images(capsys):
    assert main(["plan", "--preset", "9b", "--gpu-gb", "80", "--dtype", "int8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["max_images"] == 1813 and plan["dtype"] == "int8" and plan["weights_gb"] < 19.3
    assert main(["plan", "--preset", "9b", "--dtype", "int4"]) == 2
    assert "unknown weight dtype 'int4'" in capsys.readouterr().err
    with pytest.raises(ModelInputError):
        plan_memory("9b", gpu_gb=-1)
