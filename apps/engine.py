"""The one place where the apps call the model: a shared model answering streamed questions.

The model is loaded once (``load_shared_model``) and shared by every tab and every user session;
the Gradio queue's concurrency limit bounds how many answers run at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

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
# Model folders named like this are shown with their parent ("demo_run/model").
GENERIC_FOLDER_NAMES = frozenset({"model", "final", "checkpoint", "merged", "output"})


@dataclass
class SharedModel:
    """A loaded model, its processor and the name shown in the page and in exports."""

    model: Any
    processor: Any
    name: str = "model"

    def image_size(self) -> int:
        """Side of one image as the vision tower sees it (the tile size for satellite grids)."""
        return int(self.model.config.image_size)


def load_shared_model(path: str, device: str = "cpu") -> SharedModel:
    """Load a model folder (or ``"demo"``) once for all app sessions."""
    from longllava.loading import load_model

    model, processor = load_model(path, device=device)
    model.eval()
    parts = str(path).rstrip("/").split("/")
    name = "demo" if path == "demo" else "/".join(parts[-2:]) if parts[-1] in GENERIC_FOLDER_NAMES else parts[-1]
    return SharedModel(model=model, processor=processor, name=name)


def stream_answer(
    shared: SharedModel,
    messages: Sequence[dict],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    progress: ProgressCallback | None = None,
) -> Iterator[str]:
    """Yield the answer to the chat ``messages`` (whose first user turn holds the image prompt).

    Runs :class:`longllava.session.LongContextSession`: images encoded in batches, the prompt
    prefilled in chunks, greedy decoding streamed piece by piece; ``progress(done, total, what)`` is
    called per image batch, prefill chunk and token.
    """
    from longllava.session import LongContextSession

    session = LongContextSession(shared.model, shared.processor, progress=progress)
    yield from session.generate(list(messages), list(images), max_new_tokens=max_new_tokens, stream=True)
