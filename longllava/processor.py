"""LongLlavaProcessor: CLIP image processor + tokenizer; expands each ``<image>`` to its tokens.

``processor(text=..., images=[PIL...], return_tensors="pt")`` returns ``input_ids``,
``attention_mask`` and ``pixel_values`` (n_images, 3, S, S), with every ``<image>`` in the text
replaced by ``tokens_per_image`` copies (144 for the real presets). Images are matched to
placeholders in order; a count mismatch raises :class:`ModelInputError`. Non-square images are first
padded to a square with CLIP's mean colour (``pad_to_square``, as upstream LLaVA's
``image_aspect_ratio: pad``), then resized to the CLIP input size, so no part of an image is cropped.

Build the text with :mod:`longllava.protocol` (``images_prompt``, ``series_prompt``, ``grid_prompt``)
and the chat template (:meth:`LongLlavaProcessor.apply_chat_template`, or :func:`build_chat_inputs`
for ``messages`` + images in one call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from longllava import protocol
from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError


def build_image_processor(config: LongLlavaConfig) -> CLIPImageProcessorPil:
    """CLIP preprocessing (resize shortest side, centre crop, CLIP mean/std) at the preset's input size."""
    size = config.vision_config.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_convert_rgb=True,
    )


class LongLlavaProcessor(ProcessorMixin):
    """Tokenizer + image processor with LongLLaVA's placeholder expansion (see module docstring)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        tokens_per_image: int = 144,
        image_token: str = protocol.IMAGE_TOKEN,
        pad_to_square: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        if tokenizer is None or image_processor is None:
            raise ModelInputError("LongLlavaProcessor needs both an image processor and a tokenizer")
        self.tokens_per_image = int(tokens_per_image)
        self.image_token = image_token
        self.pad_to_square = bool(pad_to_square)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ModelInputError(f"the tokenizer has no {image_token!r} token: add it as a special token")
        if chat_template is None:
            chat_template = tokenizer.chat_template or protocol.CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_config(cls, config: LongLlavaConfig, tokenizer: Any) -> LongLlavaProcessor:
        """A processor for a model ``config`` (input size, tokens per image) and a tokenizer."""
        processor = cls(build_image_processor(config), tokenizer, tokens_per_image=config.tokens_per_image)
        if processor.image_token_id != config.image_token_id:
            raise ModelInputError(
                f"tokenizer maps {processor.image_token!r} to id {processor.image_token_id} but the model "
                f"config expects image_token_id {config.image_token_id}"
            )
        return processor

    def expand_image_tokens(self, text: str) -> str:
        """Replace every ``<image>`` with ``tokens_per_image`` copies."""
        return text.replace(self.image_token, self.image_token * self.tokens_per_image)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Image.Image] | Image.Image | torch.Tensor | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenise ``text`` (one string or a batch) with expanded placeholders and preprocess ``images``.

        ``images``: PIL images (or an already preprocessed (n, 3, S, S) tensor) for all ``<image>``
        placeholders of all texts, in order.
        """
        if text is None:
            raise ModelInputError("LongLlavaProcessor needs text (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        image_list = _as_image_list(images)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        n_images = len(image_list) if not isinstance(image_list, torch.Tensor) else image_list.shape[0]
        if n_placeholders != n_images:
            raise ModelInputError(
                f"the prompt has {n_placeholders} {self.image_token} placeholders but {n_images} images were "
                f"given: use exactly one {self.image_token} per image"
            )
        data: dict[str, Any] = {}
        if n_images:
            data["pixel_values"] = self.preprocess_images(image_list)
        encoded = self.tokenizer(
            [self.expand_image_tokens(t) for t in texts],
            add_special_tokens=False,
            padding=padding,
            return_tensors=return_tensors,
            **kwargs,
        )
        data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def preprocess_images(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images -> pixel_values (n, 3, S, S) float32; a tensor is checked and passed through."""
        size = self.image_processor.crop_size["height"]
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise ModelInputError(f"pixel_values must be (n, 3, {size}, {size}), got {tuple(images.shape)}")
            return images
        if self.pad_to_square:
            fill = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
            images = [pad_to_square(image.convert("RGB"), fill) for image in images]
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def apply_chat_template(
        self,
        conversation: Sequence[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        images: Sequence[Image.Image] | None = None,
        **kwargs: Any,
    ) -> str | BatchFeature:
        """Render ``[{role, content}]`` with the Jamba template (placeholders NOT yet expanded).

        ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` /
        ``{"type": "image"}`` (an image part becomes ``<img><image></img>``). With ``tokenize=True``
        returns ``self(text=..., images=images)``.
        """
        messages = [_flatten_message(m, i) for i, m in enumerate(conversation)]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )
        if not tokenize:
            return text
        return self(text=text, images=images, **kwargs)

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` on a square canvas of colour ``fill`` (LLaVA's ``image_aspect_ratio: pad``).

    Odd padding puts the extra pixel after the image (bottom/right); nothing is cropped later.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _as_image_list(images: Any) -> list | torch.Tensor:
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        return images if images.ndim == 4 else images.unsqueeze(0)
    if isinstance(images, Image.Image):
        return [images]
    return list(images)


def _flatten_message(message: dict, index: int) -> dict:
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message.get("role"), "content": content}
    if not isinstance(content, list):
        raise ModelInputError(f"message {index} content must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append(protocol.image_block())
        else:
            raise ModelInputError(f"message {index} has a part of unknown type {kind!r}: use 'text' or 'image'")
    return {"role": message.get("role"), "content": "".join(pieces)}


def build_chat_inputs(
    processor: LongLlavaProcessor,
    messages: Sequence[dict],
    images: Sequence[Image.Image] | torch.Tensor | None = None,
    add_generation_prompt: bool = True,
) -> BatchFeature:
    """``messages`` (with ``<image>`` placeholders or image parts) + images -> model inputs (batch of 1)."""
    return processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, images=images
    )


AutoProcessor.register(LongLlavaConfig, LongLlavaProcessor, exist_ok=True)
