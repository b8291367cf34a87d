"""LongLlavaConfig: CLIP vision tower + 2D pooling + mlp2x_gelu projector + Jamba language model.

A :class:`transformers.LlavaConfig` subclass (``model_type = "longllava"``) whose ``vision_config`` is a
``CLIPVisionConfig`` and ``text_config`` a ``JambaConfig``. What LongLLaVA adds to LLaVA is
``pooled_grid``: the ``g x g`` grid of CLIP patch features (24 x 24 for ViT-L/14 at 336 px) is
bilinearly resized to ``pooled_grid x pooled_grid`` (12 x 12 = 144 tokens per image).

Named presets (``LongLlavaConfig.from_preset(name)``); parameter counts are computed on the meta
device by :func:`count_parameters` and checked by ``tests/longllava/test_config.py``:

========  ======================================================================  =============  ============
preset    shape                                                                   total params   active/token
========  ======================================================================  =============  ============
tiny      CLIP 56 px / patch 7 (8x8 -> 4x4 = 16 tokens), 3 ViT layers of 32;       152,904        128,328
          Jamba 4 layers (2 attention, 2 MoE with 4 experts top-2), hidden 32.
          Unit tests: every code path in seconds.
demo      CLIP 160 px / patch 16 (10x10 -> 5x5 = 25 tokens), 6 ViT layers of      12.2 M         12.2 M
          192; Jamba 8 layers (1 attention), hidden 256, dense MLP 640, vocab
          4096. The bundled CPU model: 48.9 MB in fp32, 24.4 MB in bf16.
9b        CLIP ViT-L/14-336 (24x24 -> 12x12 = 144 tokens); Jamba 32 layers,       9.615 B        9.615 B
          hidden 4096, 4 attention layers, dense MLP (LongLLaVA-9B).
a13b      same with 16 experts top-2 in every other layer (LongLLaVA-A13B,        51.895 B       12.435 B
          Jamba-v0.1 body).
========  ======================================================================  =============  ============

Vision tower of 9b/a13b: 303.5 M; projector 21.0 M. Counts assume the text vocabulary of the preset;
models built with :func:`longllava.loading.build_model` size the vocabulary to their tokenizer.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, JambaConfig, LlavaConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from longllava.errors import ModelInputError

# Token ids fixed by longllava.tokenizer.build_tokenizer (special tokens come first in its vocabulary).
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 6

_CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=336,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# Jamba-v0.1 body (LongLLaVA-A13B); LongLLaVA-9B keeps one expert (dense MLP in every layer).
_JAMBA_V01 = dict(
    vocab_size=65536,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_experts=16,
    num_experts_per_tok=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    attn_layer_period=8,
    attn_layer_offset=4,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=256,
    max_position_embeddings=262144,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            patch_size=7,
            image_size=56,
            projection_dim=32,
        ),
        text=dict(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            max_position_embeddings=8192,
        ),
        pooled_grid=4,
    ),
    "demo": dict(
        vision=dict(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=3,
            patch_size=16,
            image_size=160,
            projection_dim=192,
        ),
        text=dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=640,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_experts=1,
            num_experts_per_tok=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=8,
            attn_layer_offset=4,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=16,
            max_position_embeddings=262144,
        ),
        pooled_grid=5,
    ),
    "9b": dict(vision=_CLIP_VIT_L_336, text={**_JAMBA_V01, "num_experts": 1, "num_experts_per_tok": 1}, pooled_grid=12),
    "a13b": dict(vision=_CLIP_VIT_L_336, text=_JAMBA_V01, pooled_grid=12),
}


@strict
class LongLlavaConfig(LlavaConfig):
    """LLaVA config with a CLIP vision tower, a Jamba text model and LongLLaVA's 2D pooling.

    ``pooled_grid``: side of the pooled patch grid (12 for the real models: 24x24 -> 12x12).
    ``tokens_per_image`` = ``pooled_grid ** 2``: how many ``<image>`` tokens each image occupies.
    ``image_token_id`` (alias of LLaVA's ``image_token_index``): id of ``<image>`` in the tokenizer.

    Grid places (not in the paper; off, ``grid_places = 0``, for its models): with ``grid_places = N`` a
    learned row vector and column vector (``N`` of each) are added to every token of each tile of a
    protocol grid (longllava.modeling.grid_image_places), so that the language model, which has no
    positional encoding, sees which tile a token comes from. ``grid_newline_id`` and ``grid_separator_ids``
    are the tokenizer's ids of the newline between rows and of the tokens around each image block
    (``<img>``, ``</img>``); ``grid_place_norm`` is the norm each place vector starts at.
    """

    model_type = "longllava"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=dict(_CLIP_VIT_L_336)
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="jamba"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = IMAGE_TOKEN_ID
    image_seq_length: int = 144
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list[int] = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    pooled_grid: int = 12
    projector_type: str = "mlp2x_gelu"
    pooling: str = "bilinear_2d"
    grid_places: int = 0
    grid_newline_id: int = -1
    grid_separator_ids: list[int] | None = None
    grid_place_norm: float = 8.0

    def __post_init__(self, **kwargs):
        if isinstance(self.pooled_grid, bool) or not isinstance(self.pooled_grid, int) or self.pooled_grid < 1:
            raise ValueError(f"pooled_grid must be a positive integer, got {self.pooled_grid!r}")
        if isinstance(self.grid_places, bool) or not isinstance(self.grid_places, int) or self.grid_places < 0:
            raise ValueError(f"grid_places must be an integer >= 0, got {self.grid_places!r}")
        if self.grid_places and (self.grid_newline_id < 0 or not self.grid_separator_ids):
            raise ValueError("grid_places needs grid_newline_id and grid_separator_ids (the tokenizer's ids of the "
                             "newline between grid rows and of <img>, </img>)")
        super().__post_init__(**kwargs)
        self.image_seq_length = self.pooled_grid**2

    def validate_architecture(self):
        """Part of ``@strict`` validation: the shapes LongLLaVA's pooling and projector rely on."""
        if self.vision_feature_select_strategy != "default":
            raise ValueError("LongLLaVA drops the CLS token: vision_feature_select_strategy must be 'default'")
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index, got {self.vision_feature_layer!r}")
        if self.projector_type != "mlp2x_gelu" or self.pooling != "bilinear_2d":
            raise ValueError(
                f"unsupported projector/pooling {self.projector_type!r}/{self.pooling!r}: "
                "LongLLaVA uses mlp2x_gelu and bilinear_2d"
            )
        if self.pooled_grid < 1:
            raise ValueError(f"pooled_grid must be >= 1, got {self.pooled_grid}")

    @property
    def patch_grid(self) -> int:
        """Side of CLIP's patch grid (24 for 336 px / patch 14)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Number of LLM tokens one image becomes after pooling (144 for the real presets)."""
        return self.pooled_grid**2

    @property
    def image_size(self) -> int:
        """Input side length in pixels expected by the vision tower."""
        return self.vision_config.image_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LongLlavaConfig:
        """A named preset (``tiny``, ``demo``, ``9b``, ``a13b``); ``overrides`` set top-level fields."""
        if name not in PRESETS:
            raise ModelInputError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        preset = copy.deepcopy(PRESETS[name])
        vision = CLIPVisionConfig(**preset["vision"])
        text = JambaConfig(
            **preset["text"], pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID
        )
        return cls(vision_config=vision, text_config=text, pooled_grid=preset["pooled_grid"], **overrides)

    @classmethod
    def from_file(cls, path: str | Path) -> LongLlavaConfig:
        """A config from a ``config.json`` file or a folder holding one (ModelInputError if unreadable)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelInputError(f"config file {file} does not exist")
        try:
            return cls.from_json_file(str(file))
        except (OSError, ValueError, TypeError) as error:
            raise ModelInputError(f"{file} is not a valid LongLLaVA config ({error})") from None


AutoConfig.register(LongLlavaConfig.model_type, LongLlavaConfig, exist_ok=True)


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


@lru_cache(maxsize=16)
def _count_preset(name: str) -> dict[str, int]:
    return count_parameters(LongLlavaConfig.from_preset(name))


def preset_parameter_counts(name: str) -> dict[str, int]:
    """Cached :func:`count_parameters` of a preset."""
    return dict(_count_preset(name))


def count_parameters(config: LongLlavaConfig) -> dict[str, int]:
    """Parameter counts of a model built from ``config``, on the meta device (no memory allocated).

    Returns ``vision``, ``projector``, ``language`` (embeddings, layers, lm_head), ``total`` and
    ``active`` (parameters used per token: routed MoE layers count ``num_experts_per_tok`` experts).
    """
    import torch

    from longllava.modeling import LongLlavaForConditionalGeneration

    with torch.device("meta"):
        model = LongLlavaForConditionalGeneration(config)
    counts = {"vision": 0, "projector": 0, "language": 0, "inactive_experts": 0}
    text = config.text_config
    for name, param in model.named_parameters():
        n = param.numel()
        if ".vision_tower." in f".{name}":
            counts["vision"] += n
        elif "multi_modal_projector" in name:
            counts["projector"] += n
        else:
            counts["language"] += n
        if name.endswith("feed_forward.experts.gate_up_proj") or name.endswith("feed_forward.experts.down_proj"):
            counts["inactive_experts"] += n * (text.num_experts - text.num_experts_per_tok) // text.num_experts
    total = counts["vision"] + counts["projector"] + counts["language"]
    return {
        "vision": counts["vision"],
        "projector": counts["projector"],
        "language": counts["language"],
        "total": total,
        "active": total - counts["inactive_experts"],
    }
