"""The one place where the apps call the model: a shared model answering streamed questions.

The model is loaded once (``load_shared_model``) and shared by every tab and every user session;
the Gradio queue's concurrency limit bounds how many answers run at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from longllava.protocol import render_prompt

LOG = logging.getLogger("longllava.apps")

ProgressCallback = Callable[[int, int, str], None]

# Gradio queue groups shared by both tabs: at most ``concurrency_limit`` model calls (answers,
# checklists) run at once across all users and tabs, uploads are parsed in their own group, and
# viewer updates (slice slider, window) never wait behind the model.
MODEL_QUEUE = "model"
LOAD_QUEUE = "load"
VIEW_QUEUE = "view"
VIEW_CONCURRENCY = 8
# A session's loaded study/image is dropped this long after its last use.
STATE_TTL_S = 2 * 3600


@dataclass
class SharedModel:
    """A loaded model, its processor and the name shown in the page and in exports."""

    model: Any
    processor: Any
    name: str = "model"

    def image_size(self) -> int:
        """Side of one image as the vision tower sees it (the tile size for satellite grids)."""
        vision = getattr(getattr(self.model, "config", None), "vision_config", None)
        size = getattr(vision, "image_size", None)
        if isinstance(size, int) and size > 0:
            return size
        image_processor = getattr(self.processor, "image_processor", None)
        crop = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None)
        if isinstance(crop, dict):
            return int(crop.get("height") or crop.get("shortest_edge") or 336)
        return 336


def load_shared_model(path: str, device: str = "cpu") -> SharedModel:
    """Load a model folder (or ``"demo"``) once for all app sessions."""
    from longllava.loading import load_model

    model, processor = load_model(path, device=device)
    model.eval()
    name = "demo" if path == "demo" else str(path).rstrip("/").rsplit("/", 1)[-1]
    return SharedModel(model=model, processor=processor, name=name)


def stream_answer(
    shared: SharedModel,
    messages: Sequence[dict],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    progress: ProgressCallback | None = None,
) -> Iterator[str]:
    """Yield the answer to the chat ``messages`` (whose first user turn holds the image prompt).

    Uses the long-context session when the engine provides one (batched image encoding, chunked
    prefill, progress over image batches); otherwise ``model.generate`` with a text streamer.
    """
    session_cls = _session_class()
    if session_cls is not None:
        yield from _stream_with_session(session_cls, shared, messages, images, max_new_tokens, progress)
    else:
        yield from _stream_with_generate(shared, messages, images, max_new_tokens, progress)


def _session_class() -> type | None:
    try:
        from longllava.session import LongContextSession
    except ImportError:
        return None
    return LongContextSession


def _stream_with_session(
    session_cls: type,
    shared: SharedModel,
    messages: Sequence[dict],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    progress: ProgressCallback | None,
) -> Iterator[str]:
    session = session_cls(shared.model, shared.processor, progress=progress)
    yield from session.generate(list(messages), list(images), max_new_tokens=max_new_tokens, stream=True)


def _stream_with_generate(
    shared: SharedModel,
    messages: Sequence[dict],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    progress: ProgressCallback | None,
) -> Iterator[str]:
    import torch
    from transformers import TextIteratorStreamer

    prompt = render_prompt(list(messages), add_generation_prompt=True)
    if progress:
        progress(0, len(images), f"encoding {len(images)} images")
    inputs = shared.processor(text=prompt, images=list(images) or None, return_tensors="pt")
    inputs = inputs.to(shared.model.device) if hasattr(inputs, "to") else inputs
    tokenizer = getattr(shared.processor, "tokenizer", shared.processor)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.inference_mode():
                shared.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False)
        except BaseException as error:  # re-raised in the caller's thread below
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=generate, name="longllava-generate", daemon=True)
    worker.start()
    for piece in streamer:
        if progress:
            progress(len(images), len(images), "generating")
        yield piece
    worker.join()
    if failure:
        raise failure[0]
