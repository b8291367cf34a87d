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
* optional grid places (``config.grid_places > 0``, not in the paper): a learned row and column vector
  added to every token of each tile of a protocol grid (:func:`grid_image_places`,
  :meth:`LongLlavaModel.add_grid_places`), in ``forward`` and in longllava.session's prefill.

Pre-encoded images (streaming encoders) can be passed to ``forward`` as
``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}`` where
``features`` (n_images, tokens_per_image, text_hidden) comes from :meth:`LongLlavaModel.encode_images`
(a tuple or list: LlavaModel.forward concatenates it).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

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


class TowerFeatureCache:
    """Pooled vision-tower features by image content, so a frozen tower encodes each distinct image once.

    A training run with a frozen tower (stages ``sft`` / ``multi`` / ``align`` without ``train_vision_tower``)
    sees the same images again and again (a CT study in several conversations, a slab as a single image
    and inside its study); :class:`LongLlavaModel` asks this cache before running the tower. Keys are a
    128-bit BLAKE2b digest of each image's pixel values, so two records that render the same pixels share
    one entry whatever their file names. Entries are detached and stored until ``max_bytes`` is reached;
    after that new images are encoded and not kept. The cached tensor is what the tower gives for that
    image in the batch it was first seen in, so a run with the cache differs from one without only by
    float rounding (batched matrix products may round differently).
    """

    def __init__(self, max_bytes: int = 2 * 2**30, path: str | Path | None = None):
        self.max_bytes = max_bytes
        self.path = Path(path) if path is not None else None  # where a training run saves and reloads it
        self.loaded = 0  # entries read back from a file
        self.stored_bytes = 0
        self.hits = 0
        self.misses = 0
        self._features: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    @staticmethod
    def image_key(image: torch.Tensor) -> bytes:
        """Content key of one image's pixel values (3, H, W): dtype, shape and bytes."""
        digest = hashlib.blake2b(_tensor_bytes(image), digest_size=16)
        digest.update(f"{image.dtype}{tuple(image.shape)}".encode())
        return digest.digest()

    def pooled(self, pixel_values: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(n, 3, H, W) -> (n, p*p, Cv): cached features where known; ``encode`` runs once on the unknown
        distinct images (in first-seen order) and its results are kept while there is room."""
        keys = [self.image_key(image) for image in pixel_values]
        unknown: list[int] = []  # the first index of each distinct image not in the cache
        seen: set[bytes] = set()
        for index, key in enumerate(keys):
            if key not in self._features and key not in seen:
                unknown.append(index)
                seen.add(key)
        self.hits += len(keys) - len(unknown)
        self.misses += len(unknown)
        fresh: dict[bytes, torch.Tensor] = {}
        if unknown:
            encoded = encode(pixel_values[unknown]).detach()  # (n_unknown, p*p, Cv)
            for index, features in zip(unknown, encoded):
                fresh[keys[index]] = features
                self._store(keys[index], features)
        return torch.stack([self._features.get(key, fresh.get(key)) for key in keys])

    def save(self, path: str | Path) -> None:
        """Write every entry to ``path`` (safetensors: ``keys`` (n, 16) uint8, ``features`` (n, p*p, Cv))."""
        from safetensors.torch import save_file

        if not self._features:
            return
        keys = torch.tensor([list(key) for key in self._features], dtype=torch.uint8)  # (n, 16)
        features = torch.stack([features.cpu() for features in self._features.values()])  # (n, p*p, Cv)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.partial-{os.getpid()}")  # each writer its own: runs may share a cache
        save_file({"keys": keys, "features": features}, str(partial))
        partial.replace(path)  # never a half-written cache file

    def load(self, path: str | Path, device: torch.device | str = "cpu") -> int:
        """Add the entries of a file :meth:`save` wrote (within ``max_bytes``); returns how many are stored now.
        The caller names the file after the tower (:func:`tower_digest`): features of another tower must
        never be read back."""
        from safetensors.torch import load_file

        tensors = load_file(str(path), device=str(device))
        for key, features in zip(tensors["keys"], tensors["features"]):
            self._store(bytes(key.tolist()), features)
        self.loaded = len(self)
        return self.loaded

    def _store(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self.stored_bytes + size <= self.max_bytes:
            self._features[key] = features.clone()  # a view would keep the whole batch's tensor alive
            self.stored_bytes += size


def tower_digest(model: LongLlavaModel) -> str:
    """Hex digest of what a :class:`TowerFeatureCache` entry depends on: the vision tower's weights, the
    feature layer and the pooled grid."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{model.config.vision_feature_layer}|{model.config.pooled_grid}".encode())
    for name, tensor in sorted(model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype (bf16 included), on the CPU."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


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


def _image_blocks(input_ids: torch.Tensor, image_token_id: int) -> tuple[list[int], list[int]]:
    """Start and end (exclusive) positions of each run of image tokens in (seq,) ``input_ids``."""
    is_image = (input_ids == image_token_id).long()
    edges = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    return torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()


def _grid_rows(segments: list[list[int]]) -> list[tuple[int, int, int]]:
    """(image, row, column) of the tiles of one run of image blocks split into newline-separated
    ``segments`` (block indices): ``thumbnail \n row \n row ...`` or ``row \n row ...`` with rows of
    equal length (longllava.protocol.grid_prompt); none when the run is not such a grid."""
    if len(segments) < 2:
        return []
    if len(segments[0]) == 1 and len({len(row) for row in segments[1:]}) == 1:
        rows = segments[1:]  # a single block before equal rows: the thumbnail (the protocol always writes one)
    elif len({len(row) for row in segments}) == 1:
        rows = segments
    else:
        return []
    return [(image, r + 1, c + 1) for r, row in enumerate(rows) for c, image in enumerate(row)]


def grid_image_places(input_ids: torch.Tensor, image_token_id: int, newline_id: int,
                      separator_ids: Sequence[int]) -> torch.Tensor:
    """(seq,) token ids -> (n_images, 2): the 1-based (row, column) of every image that is a tile of a
    protocol grid, (0, 0) for every other image (a grid's thumbnail, series frames, separate images).

    A grid is a run of image blocks joined only by ``separator_ids`` (``</img><img>``: next column) or by
    them around one ``newline_id`` (next row), as :func:`longllava.protocol.grid_prompt` writes it
    without tile labels. A run whose first newline-separated part is a single image followed by rows of
    equal length reads as thumbnail + rows (a 1-column grid without a thumbnail reads the same way)."""
    starts, ends = _image_blocks(input_ids, image_token_id)
    places = torch.zeros(len(starts), 2, dtype=torch.long)
    separators = set(int(i) for i in separator_ids)
    run: list[list[int]] = [[0]] if starts else []
    runs = [run]
    for index in range(1, len(starts)):
        gap = input_ids[ends[index - 1]:starts[index]].tolist()
        newlines = gap.count(newline_id)
        if newlines <= 1 and all(token in separators or token == newline_id for token in gap):
            if newlines:
                run.append([index])
            else:
                run[-1].append(index)
        else:
            run = [[index]]
            runs.append(run)
    for segments in runs:
        for image, row, col in _grid_rows(segments):
            places[image] = torch.tensor([row, col])
    return places


def enable_grid_places(model: nn.Module, grid_places: int, newline_id: int, separator_ids: Sequence[int],
                       norm: float = 8.0, seed: int = 0) -> None:
    """Give a LongLlava model without them grid place vectors (``config.grid_places``): ``grid_places``
    rows and columns, random directions of length ``norm`` (seeded), written to its config."""
    body = model.model if isinstance(model, LongLlavaForConditionalGeneration) else model
    if body.grid_place_embeddings is not None:
        raise ModelInputError(f"the model already has grid places (grid_places={body.config.grid_places})")
    for config in {id(c): c for c in (model.config, body.config)}.values():
        config.grid_newline_id, config.grid_separator_ids = int(newline_id), [int(i) for i in separator_ids]
        config.grid_places, config.grid_place_norm = int(grid_places), float(norm)
    body.config.validate()
    hidden = body.config.text_config.hidden_size
    weight = body.get_input_embeddings().weight
    body.grid_place_embeddings = nn.Parameter(_place_vectors(grid_places, hidden, norm, seed).to(weight))


def _place_vectors(grid_places: int, hidden: int, norm: float, seed: int) -> torch.Tensor:
    """(2, grid_places, hidden): row vectors then column vectors, random directions of length ``norm``."""
    vectors = torch.randn(2, grid_places, hidden, generator=torch.Generator().manual_seed(seed))
    return vectors * (norm / vectors.norm(dim=-1, keepdim=True))


@torch.no_grad()
def append_language_layers(model: nn.Module, num_hidden_layers: int, attn_layer_period: int,
                           attn_layer_offset: int, seed: int = 0) -> list[str]:
    """Grow a LongLlava model's Jamba body to ``num_hidden_layers`` layers under the layout
    ``attn_layer_period`` / ``attn_layer_offset`` (attention where ``i % period == offset``), appending the new
    layers after the trained ones; returns the appended layers' types.

    The layout must keep every existing layer's type. Each new layer gets transformers' init (seeded by
    ``seed``) and Mamba's time-step init, then zero output projections (attention ``o_proj``, Mamba
    ``out_proj``, feed-forward ``down_proj``), so the grown model computes exactly what it did before and
    training decides what the new layers add."""
    from transformers.models.jamba.modeling_jamba import ALL_DECODER_LAYER_TYPES

    body = model.model if isinstance(model, LongLlavaForConditionalGeneration) else model
    language_model, text_config = body.language_model, body.config.text_config
    before = list(text_config.layers_block_type)
    grown = _grown_layout(text_config, num_hidden_layers, attn_layer_period, attn_layer_offset)
    if num_hidden_layers <= len(before) or grown[:len(before)] != before:
        raise ModelInputError(
            f"cannot grow the language model from {len(before)} layers ({_layout(before)}) to {num_hidden_layers} "
            f"with attention period {attn_layer_period}, offset {attn_layer_offset} ({_layout(grown)}): the new "
            "layout must have more layers and keep every existing layer's type")
    text_config.num_hidden_layers = num_hidden_layers
    text_config.attn_layer_period, text_config.attn_layer_offset = attn_layer_period, attn_layer_offset
    reference = next(language_model.layers[0].parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in range(len(before), num_hidden_layers):
            layer = ALL_DECODER_LAYER_TYPES[grown[index]](text_config, layer_idx=index)
            layer.apply(language_model._init_weights)
            init_mamba_time_steps(layer, seed=seed + index)
            for name, parameter in layer.named_parameters():
                if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")):
                    parameter.zero_()
            language_model.layers.append(layer.to(reference))
    return grown[len(before):]


def _grown_layout(text_config, num_hidden_layers: int, attn_layer_period: int, attn_layer_offset: int) -> list[str]:
    """The layer types Jamba's own config gives for the grown shape; [] for an offset outside the period."""
    if not 0 <= attn_layer_offset < attn_layer_period:
        return []
    grown_config = copy.deepcopy(text_config)
    grown_config.num_hidden_layers = num_hidden_layers
    grown_config.attn_layer_period, grown_config.attn_layer_offset = attn_layer_period, attn_layer_offset
    return list(grown_config.layers_block_type)


def _layout(types: Sequence[str]) -> str:
    """'attention at 4, 9' for a layer-type list; 'no layout' for an offset outside the period."""
    if not types:
        return "no layout: the offset must be at least 0 and below the period"
    return "attention at " + ", ".join(str(i) for i, kind in enumerate(types) if kind == "attention")


class LongLlavaModel(LlavaModel):
    """LLaVA body with LongLLaVA's pooled image features (see module docstring)."""

    config_class = LongLlavaConfig
    config: LongLlavaConfig

    def __init__(self, config: LongLlavaConfig):
        super().__init__(config)
        self.grid_place_embeddings = None
        if config.grid_places:
            hidden = config.text_config.hidden_size
            self.grid_place_embeddings = nn.Parameter(_place_vectors(config.grid_places, hidden,
                                                                     config.grid_place_norm, seed=0))

    def add_grid_places(self, image_features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """image_features (n_images, tokens_per_image, H) of the images of ``input_ids`` (batch, seq), in
        order -> the same with each grid tile's row and column vectors added (unchanged without grid places).
        Places past ``grid_places`` use the last vector."""
        if self.grid_place_embeddings is None:
            return image_features
        config = self.config
        places = torch.cat([grid_image_places(ids, config.image_token_id, config.grid_newline_id,
                                              config.grid_separator_ids) for ids in input_ids.reshape(-1, input_ids.shape[-1]).cpu()])
        if len(places) != len(image_features):
            raise ModelInputError(f"the prompt has {len(places)} image blocks but {len(image_features)} images were "
                                  "given: use one <image> placeholder per image and expand it with LongLlavaProcessor")
        places = places.to(image_features.device)
        table = self.grid_place_embeddings.to(image_features.dtype)
        index = (places - 1).clamp(0, config.grid_places - 1)  # (n, 2)
        vectors = table[0, index[:, 0]] + table[1, index[:, 1]]  # (n, H)
        vectors = vectors * (places[:, :1] > 0)  # images that are not grid tiles get nothing
        return image_features + vectors[:, None, :]

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                mm_encoder_outputs: dict | None = None, **kwargs):
        """LlavaModel.forward, with grid places added to the image features first (when the model has them)."""
        encoded = (mm_encoder_outputs or {}).get("image")
        if self.grid_place_embeddings is not None and input_ids is not None and (
                pixel_values is not None or encoded is not None):
            if encoded is None:
                encoded = self.get_image_features(pixel_values=pixel_values, return_dict=True)
            stacked = torch.stack(tuple(encoded.pooler_output))  # (n, tokens_per_image, H)
            # a new output object: the caller's pre-encoded features must not get the places twice
            placed = BaseModelOutputWithPooling(pooler_output=tuple(self.add_grid_places(stacked, input_ids).unbind(0)))
            mm_encoder_outputs, pixel_values = {**(mm_encoder_outputs or {}), "image": placed}, None
        return super().forward(input_ids=input_ids, pixel_values=pixel_values,
                               mm_encoder_outputs=mm_encoder_outputs, **kwargs)

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
        if self._tower_cache_applies():
            pooled = self.tower_feature_cache.pooled(
                pixel_values, lambda images: self._pooled_tower_features(images, vision_feature_layer, **kwargs)[1])
            image_outputs = BaseModelOutputWithPooling()
        else:
            image_outputs, pooled = self._pooled_tower_features(pixel_values, vision_feature_layer, **kwargs)
        projected = self.multi_modal_projector(pooled)  # (n, p*p, Ct)
        image_outputs.pooler_output = projected.unbind(0)  # n x (p*p, Ct), as LlavaModel.forward expects
        return image_outputs

    def _pooled_tower_features(self, pixel_values: torch.Tensor, feature_layer: int, **kwargs) -> tuple:
        """(tower output, pooled features (n, p*p, Cv)) of pixel_values (n, 3, H, W)."""
        image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        return image_outputs, pooled_patch_features(image_outputs.hidden_states, feature_layer, self.config.pooled_grid)

    def vision_tower_frozen(self) -> bool:
        """No vision-tower weight is trainable (its features then depend on the image alone)."""
        return not any(parameter.requires_grad for parameter in self.vision_tower.parameters())

    def _tower_cache_applies(self) -> bool:
        """A :class:`TowerFeatureCache` is attached and the tower cannot change or vary: every weight frozen,
        and no attention dropout active."""
        if getattr(self, "tower_feature_cache", None) is None or not self.vision_tower_frozen():
            return False
        dropout = getattr(self.config.vision_config, "attention_dropout", 0.0)
        return not (self.vision_tower.training and dropout > 0)

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
