"""LongLLaVA's data-processing protocol (paper, section 3.2) and the Jamba chat template.

How images relate is told to the model with text around each ``<image>`` placeholder:

* separate images:      ``<img><image></img>`` per image, concatenated;
* an ordered series:    ``<vid>`` + frames joined by ``<t>`` + ``</vid>``, each frame ``<img><image></img>``
  (video frames, CT slices);
* sub-images of one large image: the thumbnail, ``\\n``, then the grid row by row (top-left to
  bottom-right), each row a run of ``<img><image></img>``, rows separated by ``\\n``. An option that
  is not the paper's (``tile_labels``, only for models trained with it) writes each tile's place
  before it as text, ``(row,column)`` 1-based: ``(1,1)<img><image></img>(1,2)...``.

The processor later expands every ``<image>`` to the model's number of tokens per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

IMAGE_TOKEN = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
VID_START = "<vid>"
VID_END = "</vid>"
FRAME_SEP = "<t>"
SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, IMG_START, IMG_END, VID_START, VID_END, FRAME_SEP)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
USER_TAG = "<|User|>"
ASSISTANT_TAG = "<|Assistant|>"
SYSTEM_TAG = "<|System|>"
CHAT_TOKENS: tuple[str, ...] = (BOS, EOS, USER_TAG, ASSISTANT_TAG, SYSTEM_TAG)

Layout = Literal["images", "series", "grid"]

# Upstream "jamba" conversation template:
#   <|startoftext|><|User|>\n{q}\n<|startoftext|><|Assistant|>\n{a}<|endoftext|>
# Newlines are written as {{ '\n' }} so that Jinja whitespace control cannot eat them.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '<|startoftext|><|System|>\n' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<|startoftext|><|User|>\n' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|startoftext|><|Assistant|>\n' + message['content'] + '<|endoftext|>' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|startoftext|><|Assistant|>\n' }}{%- endif -%}"
)


def image_block() -> str:
    """One image: ``<img><image></img>``."""
    return f"{IMG_START}{IMAGE_TOKEN}{IMG_END}"


def _check_count(name: str, n: int, minimum: int = 1) -> None:
    if not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n!r}")


def images_prompt(n: int) -> str:
    """``n`` separate images, each ``<img><image></img>``."""
    _check_count("number of images", n)
    return image_block() * n


def series_prompt(n: int) -> str:
    """An ordered series of ``n`` frames (video, CT slices): ``<vid>frame<t>frame...</vid>``."""
    _check_count("number of frames", n)
    return VID_START + FRAME_SEP.join([image_block()] * n) + VID_END


def tile_label(row: int, col: int) -> str:
    """The text written before a tile with ``tile_labels``: ``(row,column)``, 1-based."""
    return f"({row},{col})"


def grid_prompt(rows: int, cols: int, thumbnail: bool = True, tile_labels: bool = False) -> str:
    """Sub-images of one large image: thumbnail, ``\\n``, then ``rows`` rows of ``cols`` tiles.

    Tiles are listed row by row, top-left to bottom-right; rows are separated by ``\\n``.
    The image order expected by the model is therefore: thumbnail first (if any), then tiles in
    row-major order. ``tile_labels`` writes :func:`tile_label` before each tile (not the paper's
    protocol: only for models trained with it).
    """
    _check_count("grid rows", rows)
    _check_count("grid columns", cols)

    def tile(row: int, col: int) -> str:
        return (tile_label(row, col) if tile_labels else "") + image_block()

    grid = "\n".join("".join(tile(r, c) for c in range(1, cols + 1)) for r in range(1, rows + 1))
    return (image_block() + "\n" + grid) if thumbnail else grid


def visual_prompt(layout: Layout, n_images: int, grid: tuple[int, int] | None = None,
                  tile_labels: bool = False) -> str:
    """The visual part of a prompt for a layout; ``grid`` = (rows, cols) for ``layout='grid'``
    (``tile_labels``: see :func:`grid_prompt`)."""
    if layout == "images":
        return images_prompt(n_images)
    if layout == "series":
        return series_prompt(n_images)
    if layout == "grid":
        if grid is None:
            raise ValueError("layout 'grid' needs grid=(rows, cols)")
        rows, cols = grid
        if n_images not in (rows * cols, rows * cols + 1):
            raise ValueError(f"grid {rows}x{cols} needs {rows * cols} tiles (+1 thumbnail), got {n_images} images")
        return grid_prompt(rows, cols, thumbnail=n_images == rows * cols + 1, tile_labels=tile_labels)
    raise ValueError(f"unknown layout {layout!r}: use 'images', 'series' or 'grid'")


def count_images(text: str) -> int:
    """Number of ``<image>`` placeholders in ``text``."""
    return text.count(IMAGE_TOKEN)


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation; ``is_target`` marks text the model is trained to produce."""

    text: str
    is_target: bool


def render_conversation(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Segment]:
    """Render messages ``[{role, content}]`` with the chat template, split into supervised pieces.

    ``"".join(s.text for s in segments)`` equals :data:`CHAT_TEMPLATE` rendered by the tokenizer;
    only each assistant answer and its ``<|endoftext|>`` are targets.
    """
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no text content (got {type(content).__name__})")
        if role == "system":
            segments.append(Segment(f"{BOS}{SYSTEM_TAG}\n{content}\n", False))
        elif role == "user":
            segments.append(Segment(f"{BOS}{USER_TAG}\n{content}\n", False))
        elif role == "assistant":
            segments.append(Segment(f"{BOS}{ASSISTANT_TAG}\n", False))
            segments.append(Segment(f"{content}{EOS}", True))
        else:
            raise ValueError(f"message {i} has unknown role {role!r}: use system, user or assistant")
    if add_generation_prompt:
        segments.append(Segment(f"{BOS}{ASSISTANT_TAG}\n", False))
    return segments


def render_prompt(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The chat-formatted string for ``messages`` (same as the tokenizer's chat template)."""
    return "".join(s.text for s in render_conversation(messages, add_generation_prompt))
