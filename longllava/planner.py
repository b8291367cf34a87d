"""How many images fit on one GPU: weights + KV cache + Mamba state + activation peak.

The estimate is for batch size 1 and the streaming engine's way of running a long prompt: images are
encoded in batches of ``vision_batch`` and the prompt is prefilled in chunks of ``chunk_size`` tokens
(``chunk_size=None``: the whole prompt in one forward pass, as a plain ``model.generate`` does).

* **weights**: parameter bytes. ``bf16``/``fp16``: 2 bytes each; ``fp32``: 4; ``int8`` (bitsandbytes
  LLM.int8 as the Jamba/LongLLaVA model cards use it, ``llm_int8_skip_modules=["mamba"]``): 1 byte for
  linear and expert weights outside the Mamba mixers and ``lm_head``, 2 bytes for everything else.
  Activations and caches stay in bf16 with int8 weights.
* **KV cache**: only attention layers keep one (1 in 8 for Jamba): ``2 (K, V) x kv_heads x head_dim x
  tokens x bytes`` per attention layer; tokens = images x tokens_per_image + text + generated tokens.
* **Mamba state**: fixed per Mamba layer, independent of the length: conv state ``d_inner x d_conv``
  (model dtype) and SSM state ``d_inner x d_state`` (fp32: transformers' Jamba keeps the recurrent state
  in fp32 even for a bf16 model, measured in the tests).
* **activation peak**: the largest of (a) one chunk through the widest layer (hidden streams, Mamba
  projections, the MLP or routed experts, the attention layer's KV concatenation copy) and (b) one
  vision batch through CLIP plus its projected features. Assumes fused kernels (mamba-ssm, flash/SDPA
  attention): the PyTorch reference scan would materialise (d_inner x chunk x d_state) tensors.
* **overhead**: CUDA context, allocator fragmentation, workspace (``overhead_gb``, default 1.5 GB).

The largest image count is the largest N whose total fits in ``gpu_gb``, capped by the text model's
context length (``max_position_embeddings``, 262,144 tokens for Jamba: ~1,800 images of 144 tokens).
``tests/longllava/test_planner.py`` checks the KV/state/weight arithmetic against bytes measured on a
tiny model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError

GB = 1e9
WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "int8")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}


def _check_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ModelInputError(f"unknown weight dtype {dtype!r}: use one of {', '.join(WEIGHT_DTYPES)}")


def activation_bytes_per_value(dtype: str) -> int:
    """Bytes per activation/cache value: fp32 models compute in fp32, everything else in 16 bits."""
    _check_dtype(dtype)
    return 4 if dtype == "fp32" else 2


def _parameter_groups(config: LongLlavaConfig) -> dict[str, int]:
    """Parameters split into int8-quantisable (linear/expert weights outside Mamba and lm_head) and the rest."""
    import torch
    from torch import nn

    from longllava.modeling import LongLlavaForConditionalGeneration

    with torch.device("meta"):
        model = LongLlavaForConditionalGeneration(config)
    quantisable = 0
    for module_name, module in model.named_modules():
        if ".mamba" in module_name or module_name == "lm_head":
            continue
        if isinstance(module, nn.Linear):
            quantisable += module.weight.numel()
        elif module_name.endswith("feed_forward.experts"):
            quantisable += sum(p.numel() for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return {"quantisable": quantisable, "other": total - quantisable, "total": total}


@lru_cache(maxsize=16)
def _preset_groups(name: str) -> tuple[tuple[str, int], ...]:
    return tuple(_parameter_groups(LongLlavaConfig.from_preset(name)).items())


def weight_bytes(config: LongLlavaConfig, dtype: str, preset: str | None = None) -> int:
    """Bytes of all weights stored as ``dtype`` (see module docstring for int8)."""
    _check_dtype(dtype)
    groups = dict(_preset_groups(preset)) if preset else _parameter_groups(config)
    if dtype == "int8":
        return groups["quantisable"] + 2 * groups["other"]
    return _BYTES[dtype] * groups["total"]


def n_attention_layers(config: LongLlavaConfig) -> int:
    return config.text_config.layers_block_type.count("attention")


def n_mamba_layers(config: LongLlavaConfig) -> int:
    return config.text_config.layers_block_type.count("mamba")


def kv_cache_bytes(config: LongLlavaConfig, n_tokens: int, bytes_per_value: int) -> int:
    """KV cache of ``n_tokens`` tokens: attention layers only."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return n_attention_layers(config) * 2 * text.num_key_value_heads * head_dim * n_tokens * bytes_per_value


def mamba_state_bytes(config: LongLlavaConfig, bytes_per_value: int, ssm_bytes_per_value: int = 4) -> int:
    """Conv state (model dtype) + SSM state (fp32, as transformers' Jamba keeps it) of all Mamba layers.

    Independent of the sequence length.
    """
    text = config.text_config
    d_inner = text.mamba_expand * text.hidden_size
    per_layer = d_inner * text.mamba_d_conv * bytes_per_value + d_inner * text.mamba_d_state * ssm_bytes_per_value
    return n_mamba_layers(config) * per_layer


def lm_chunk_activation_bytes(
    config: LongLlavaConfig, chunk_tokens: int, context_tokens: int, bytes_per_value: int
) -> int:
    """Peak activation of one prefill chunk through the widest text layer (see module docstring)."""
    text = config.text_config
    c, h, b = chunk_tokens, text.hidden_size, bytes_per_value
    d_inner = text.mamba_expand * h
    head_dim = h // text.num_attention_heads
    streams = 4 * c * h * b  # inputs_embeds of the chunk, hidden, residual, normed
    mamba = (2 * d_inner + 4 * d_inner + text.mamba_dt_rank + 2 * text.mamba_d_state) * c * b
    one_layer_kv = 2 * text.num_key_value_heads * head_dim * context_tokens * b
    attention = c * (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim * b + one_layer_kv
    mlp = 3 * c * text.intermediate_size * b
    if text.num_experts > 1:
        mlp += c * text.num_experts * 4 + 2 * c * h * b  # fp32 router probabilities, expert accumulation
    logits = text.vocab_size * 4  # last position only (logits_to_keep=1), fp32
    return streams + max(mamba, attention, mlp) + logits


def vision_activation_bytes(config: LongLlavaConfig, vision_batch: int, bytes_per_value: int) -> int:
    """Peak activation of encoding ``vision_batch`` images (CLIP + pooling + projector)."""
    vision = config.vision_config
    tokens = config.patch_grid**2 + 1
    pixels = vision_batch * 3 * vision.image_size**2 * 4  # fp32 pixel_values
    streams = 3 * vision_batch * tokens * vision.hidden_size * bytes_per_value  # hidden, residual, captured layer
    widest = vision_batch * tokens * max(vision.intermediate_size, 3 * vision.hidden_size) * bytes_per_value
    projected = vision_batch * config.tokens_per_image * config.text_config.hidden_size * bytes_per_value
    return pixels + streams + widest + projected


@dataclass
class MemoryPlan:
    """Bytes of each part for ``images`` images, and the largest image count that fits."""

    preset: str
    dtype: str
    gpu_gb: float
    images: int
    tokens: int
    chunk_size: int | None
    weights_bytes: int
    kv_cache_bytes: int
    mamba_state_bytes: int
    activation_peak_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: bool
    max_images_memory: int
    max_images_context: int
    max_images: int
    limited_by: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in [k for k in data if k.endswith("_bytes")]:
            data[key.replace("_bytes", "_gb")] = round(data[key] / GB, 3)
        return data


def _total(config: LongLlavaConfig, weights: int, images: int, settings: dict[str, Any]) -> dict[str, int]:
    b = settings["bytes_per_value"]
    context = images * config.tokens_per_image + settings["text_tokens"] + settings["new_tokens"]
    chunk = min(settings["chunk_size"] or context, context)
    parts = {
        "tokens": context,
        "weights_bytes": weights,
        "kv_cache_bytes": kv_cache_bytes(config, context, b),
        "mamba_state_bytes": mamba_state_bytes(config, b),
        "activation_peak_bytes": max(
            lm_chunk_activation_bytes(config, chunk, context, b),
            vision_activation_bytes(config, min(settings["vision_batch"], max(images, 1)), b),
        ),
        "overhead_bytes": int(settings["overhead_gb"] * GB),
    }
    parts["total_bytes"] = sum(v for k, v in parts.items() if k.endswith("_bytes"))
    return parts


def plan_memory(
    preset: str,
    gpu_gb: float,
    dtype: str = "bf16",
    images: int = 1000,
    chunk_size: int | None = 4096,
    text_tokens: int = 512,
    new_tokens: int = 512,
    vision_batch: int = 32,
    overhead_gb: float = 1.5,
) -> MemoryPlan:
    """Memory for ``images`` images of ``preset`` on a ``gpu_gb`` GB GPU, and the largest count that fits."""
    config = LongLlavaConfig.from_preset(preset)
    _check_dtype(dtype)
    if gpu_gb <= 0 or images < 0 or (chunk_size is not None and chunk_size < 1):
        raise ModelInputError("--gpu-gb must be > 0, --images >= 0 and --chunk-size >= 1")
    settings = dict(
        bytes_per_value=activation_bytes_per_value(dtype),
        text_tokens=text_tokens,
        new_tokens=new_tokens,
        chunk_size=chunk_size,
        vision_batch=vision_batch,
        overhead_gb=overhead_gb,
    )
    weights = weight_bytes(config, dtype, preset=preset)
    budget = gpu_gb * GB
    context_limit = max(0, (config.text_config.max_position_embeddings - text_tokens - new_tokens)) // config.tokens_per_image

    def fits(n: int) -> bool:
        return _total(config, weights, n, settings)["total_bytes"] <= budget

    low, high = 0, 1
    if not fits(0):
        low = high = -1
    else:
        while fits(high) and high < 10_000_000:
            low, high = high, high * 2
        while high - low > 1:  # largest n with fits(n): fits(low) and not fits(high)
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
    max_memory = max(low, 0) if low >= 0 else 0
    parts = _total(config, weights, images, settings)
    if low < 0:
        limited_by = "weights (the model alone does not fit)"
    else:
        limited_by = "context length" if context_limit < max_memory else "GPU memory"
    return MemoryPlan(
        preset=preset,
        dtype=dtype,
        gpu_gb=gpu_gb,
        images=images,
        chunk_size=chunk_size,
        fits=parts["total_bytes"] <= budget and images <= context_limit,
        max_images_memory=max_memory,
        max_images_context=context_limit,
        max_images=min(max_memory, context_limit),
        limited_by=limited_by,
        **parts,
    )


def measure_cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes actually held by a transformers cache: attention KV and Mamba conv/SSM states."""
    measured = {"kv_cache_bytes": 0, "mamba_state_bytes": 0}
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "numel"):
                measured["kv_cache_bytes"] += tensor.numel() * tensor.element_size()
        for name in ("conv_states", "recurrent_states"):
            states = getattr(layer, name, None) or {}
            values = states.values() if isinstance(states, dict) else states
            measured["mamba_state_bytes"] += sum(t.numel() * t.element_size() for t in values if t is not None)
    return measured


def format_plan(plan: MemoryPlan) -> str:
    """Human-readable table of a plan."""
    rows = [
        ("weights", plan.weights_bytes),
        ("KV cache (attention layers)", plan.kv_cache_bytes),
        ("Mamba conv+SSM state", plan.mamba_state_bytes),
        ("activation peak", plan.activation_peak_bytes),
        ("overhead", plan.overhead_bytes),
        ("total", plan.total_bytes),
    ]
    chunk = f"chunks of {plan.chunk_size} tokens" if plan.chunk_size else "one forward pass (no chunking)"
    lines = [f"preset {plan.preset}, {plan.dtype} weights, {plan.gpu_gb:g} GB GPU, {plan.images} images "
             f"= {plan.tokens:,} tokens, prefill in {chunk}"]
    lines += [f"  {name:<30}{value / GB:>10.2f} GB" for name, value in rows]
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {plan.images} images {verdict}; largest image count: {plan.max_images:,} "
                 f"(memory allows {plan.max_images_memory:,}, context allows {plan.max_images_context:,}; "
                 f"limited by {plan.limited_by})")
    return "\n".join(lines)
