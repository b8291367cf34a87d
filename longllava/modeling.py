"""LongLlavaForConditionalGeneration: transformers' LLaVA with LongLLaVA's 2D pooling, on a Jamba LM.

transformers' ``LlavaModel`` already holds the three parts LongLLaVA needs (a CLIP vision tower built
from ``config.vision_config``, the 2-layer GELU projector ``multi_modal_projector.linear_1/linear_2``,
and a language model built from ``config.text_config`` = Jamba) and writes image features into the
``<image>`` token positions with ``masked_scatter``. This module overrides only what differs:

* :meth:`LongLlavaModel.get_image_features`: CLIP hidden states of layer ``vision_feature_layer`` (-2),
  CLS dropped, the ``g x g`` patch grid bilinearly resized to ``pooled_grid x pooled_grid``
  (:func:`pool_patch_grid`), *then* the projector. Its ``pooler_output`` is a tuple of ``n_images``
  tensors ``(tokens_per_image, text_hidden)`` (LlavaModel.forward concatenates them);
  :meth:`LongLlavaModel.encode_images` returns them stacked: ``(n_images, tokens_per_image, text_hidden)``.
* :meth:`LongLlavaModel.get_placeholder_mask`: a count mismatch raises :class:`ModelInputError`
  saying how many ``<image>`` tokens and images there are.
* the config class (``model_type = "longllava"``) and Auto-class registration.

Pre-encoded images (streaming encoders) can be passed to ``forward`` as
``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}`` where
``features`` (n_images, tokens_per_image, text_hidden) comes from :meth:`LongLlavaModel.encode_images`
(a tuple or list: LlavaModel.forward concatenates it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError


def pool_patch_grid(patch_features: torch.Tensor, pooled_grid: int) -> torch.Tensor:
    """LongLLaVA's 2D pooling: (n, g*g, C) patch features -> (n, pooled_grid**2, C).

    The square patch grid is resized with ``F.interpolate(mode="bilinear", align_corners=False)``
    (upstream ``resamplePooling: 2d``; 24x24 -> 12x12 for CLIP ViT-L/14-336).
    """
    n_images, n_patches, channels = patch_features.shape
    grid = int(round(n_patches**0.5))
    if grid * grid != n_patches:
        raise ModelInputError(f"vision tower returned {n_patches} patch tokens, not a square grid")
    # (n, g*g, C) -> (n, g, g, C) -> (n, C, g, g)
    grid_features = patch_features.reshape(n_images, grid, grid, channels).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid_features, size=(pooled_grid, pooled_grid), mode="bilinear", align_corners=False)
    # (n, C, p, p) -> (n, p*p, C)
    return pooled.flatten(2).transpose(1, 2).contiguous()


def pooled_patch_features(hidden_states: Sequence[torch.Tensor], feature_layer: int, pooled_grid: int) -> torch.Tensor:
    """The features the projector receives: the vision tower's ``feature_layer`` hidden states without
    the CLS token, 2D-pooled: (n, pooled_grid**2, C)."""
    patch_features = hidden_states[feature_layer][:, 1:]  # drop CLS: (n, g*g, C)
    return pool_patch_grid(patch_features, pooled_grid)


# Mamba's time-step init (Gu & Dao 2023; state-spaces/mamba ``dt_min``, ``dt_max``, ``dt_init_floor``).
# transformers' Jamba zeroes ``dt_proj.bias``, so every channel starts at dt = softplus(0) = 0.69 and, with
# A = -(1..d_state), forgets a token within a few steps: a from-scratch model's Mamba layers then carry
# nothing from the images to the question (only its attention layers can read them).
MAMBA_DT_RANGE = (1e-3, 1e-1)
MAMBA_DT_FLOOR = 1e-4


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


@torch.no_grad()
def init_mamba_time_steps(model: nn.Module, seed: int = 0, dt_range: tuple[float, float] = MAMBA_DT_RANGE,
                          dt_floor: float = MAMBA_DT_FLOOR) -> int:
    """Give every Mamba mixer of ``model`` Mamba's time-step init; returns how many it changed.

    Per channel dt is log-uniform in ``dt_range`` (at least ``dt_floor``) and ``dt_proj.bias`` its inverse
    softplus, so at zero input the layer keeps a channel's state for about 1/dt tokens (10 to 1,000);
    ``dt_proj.weight`` is uniform in +-rank**-0.5. Draws from its own generator seeded with ``seed``, so the
    rest of a seeded random init is unchanged. For models built from random weights; a loaded checkpoint
    keeps its trained values."""
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    low, high = (torch.log(torch.tensor(bound, dtype=torch.float64)) for bound in dt_range)
    generator = torch.Generator().manual_seed(seed)
    mixers = [module for module in model.modules() if isinstance(module, JambaMambaMixer)]
    for mixer in mixers:
        weight, bias = mixer.dt_proj.weight, mixer.dt_proj.bias
        bound = mixer.time_step_rank ** -0.5
        weight.copy_((torch.rand(weight.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
        uniform = torch.rand(bias.shape, generator=generator, dtype=torch.float64)
        dt = torch.exp(low + uniform * (high - low)).clamp(min=dt_floor)
        bias.copy_(inverse_softplus(dt))
    return len(mixers)


class LongLlavaModel(LlavaModel):
    """LLaVA body with LongLLaVA's pooled image features (see module docstring)."""

    config_class = LongLlavaConfig
    config: LongLlavaConfig

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """pixel_values (n, 3, H, W) -> output whose ``pooler_output`` is n x (tokens_per_image, text_hidden)."""
        if image_sizes is not None:
            raise ModelInputError("LongLLaVA resizes every image to the CLIP input size: image_sizes is not used")
        image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        pooled = pooled_patch_features(image_outputs.hidden_states, vision_feature_layer,
                                       self.config.pooled_grid)  # (n, p*p, Cv)
        projected = self.multi_modal_projector(pooled)  # (n, p*p, Ct)
        image_outputs.pooler_output = projected.unbind(0)  # n x (p*p, Ct), as LlavaModel.forward expects
        return image_outputs

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> projected image tokens (n, tokens_per_image, text_hidden)."""
        return torch.stack(self.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask (batch, seq, 1) of ``<image>`` positions; raises ModelInputError on a count mismatch."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            special_image_mask = (inputs_embeds == image_embedding).all(-1)
        else:
            special_image_mask = input_ids == self.config.image_token_id
        n_image_tokens = int(special_image_mask.sum())
        n_feature_tokens = image_features.numel() // inputs_embeds.shape[-1]
        if n_image_tokens != n_feature_tokens:
            per_image = self.config.tokens_per_image
            raise ModelInputError(
                f"the prompt has {n_image_tokens} <image> tokens ({n_image_tokens / per_image:g} images x "
                f"{per_image} tokens) but {n_feature_tokens // per_image} images were given: use one <image> "
                "placeholder per image and expand it with LongLlavaProcessor"
            )
        return special_image_mask.unsqueeze(-1).to(inputs_embeds.device)


class LongLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """CLIP -> 2D pooling -> mlp2x_gelu -> Jamba, with ``generate()``; weights as in transformers' LLaVA:
    ``model.vision_tower.*`` (CLIP), ``model.multi_modal_projector.linear_{1,2}.*``,
    ``model.language_model.*`` (Jamba body), ``lm_head.weight``."""

    config_class = LongLlavaConfig
    config: LongLlavaConfig

    def __init__(self, config: LongLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)  # not LlavaForConditionalGeneration's: no LlavaModel built
        self.model = LongLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> projected image tokens (n, tokens_per_image, text_hidden)."""
        return self.model.encode_images(pixel_values)


AutoModel.register(LongLlavaConfig, LongLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(LongLlavaConfig, LongLlavaForConditionalGeneration, exist_ok=True)
