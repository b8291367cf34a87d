"""The one place where the apps call the model: a shared model answering streamed questions.

The model is loaded once (``load_shared_model``) and shared by every tab and every user session;
the Gradio queue's concurrency limit bounds how many answers run at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
# Encoded images kept between questions about the same study / image (all sessions together);
# LONGLLAVA_FEATURE_CACHE_MB overrides, 0 turns the cache off.
DEFAULT_FEATURE_CACHE_MB = 2048


class FeatureCache:
    """Image features of recently asked-about studies, least recently used dropped first.

    A clinician's second question about a study then skips the vision tower (a real 9B study of 300
    slices holds 300 x 144 x 4096 bf16 = 354 MB of features; the budget bounds the total). Keys are
    opaque per-upload tokens, never file names. Thread-safe: Gradio answers in worker threads.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_env(cls) -> FeatureCache:
        value = os.environ.get("LONGLLAVA_FEATURE_CACHE_MB", str(DEFAULT_FEATURE_CACHE_MB))
        try:
            megabytes = float(value)
        except ValueError as error:
            raise ValueError(f"LONGLLAVA_FEATURE_CACHE_MB={value!r}: give a number of megabytes (0: off)") from error
        return cls(int(megabytes * 2**20))

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(_nbytes(t) for t in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str | None) -> Any:
        with self._lock:
            features = self._entries.get(key) if key is not None else None
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str | None, features: Any) -> None:
        """Keep ``features`` under ``key`` unless they alone exceed the budget; evict the oldest."""
        size = _nbytes(features)
        if key is None or size > self.budget_bytes:
            return
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = features
            while sum(_nbytes(t) for t in self._entries.values()) > self.budget_bytes:
                self._entries.popitem(last=False)


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel() * tensor.element_size())


@dataclass
class SharedModel:
    """A loaded model, its processor, the name shown in the page and exports, and the feature cache."""

    model: Any
    processor: Any
    name: str = "model"
    features: FeatureCache = field(default_factory=FeatureCache.from_env)
    notice: str = ""  # the model card's opening paragraph, shown on the page (see model_card_notice)

    def image_size(self) -> int:
        """Side of one image as the vision tower sees it (the tile size for satellite grids)."""
        return int(self.model.config.image_size)


MODEL_CARD_FILE = "MODEL_CARD.md"


def model_card_notice(model_dir: str | os.PathLike) -> str:
    """The first paragraph after the title of the folder's ``MODEL_CARD.md`` (what the model is and is
    not for), or ``""`` where the folder has no card."""
    from pathlib import Path

    card = Path(model_dir) / MODEL_CARD_FILE
    if not card.is_file():
        return ""
    lines = [line for line in card.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            break
    return " ".join(paragraph)


def load_shared_model(path: str, device: str = "cpu") -> SharedModel:
    """Load a model folder (or ``"demo"``) once for all app sessions."""
    from longllava.loading import load_model, resolve_model_dir

    model, processor = load_model(path, device=device)
    model.eval()
    parts = str(path).rstrip("/").split("/")
    name = "demo" if path == "demo" else "/".join(parts[-2:]) if parts[-1] in GENERIC_FOLDER_NAMES else parts[-1]
    return SharedModel(model=model, processor=processor, name=name, notice=model_card_notice(resolve_model_dir(path)))


def stream_answer(
    shared: SharedModel,
    messages: Sequence[dict],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    progress: ProgressCallback | None = None,
    cache_key: str | None = None,
) -> Iterator[str]:
    """Yield the answer to the chat ``messages`` (whose first user turn holds the image prompt).

    Runs :class:`longllava.session.LongContextSession`: images encoded in batches, the prompt
    prefilled in chunks, greedy decoding streamed piece by piece; ``progress(done, total, what)`` is
    called per image batch, prefill chunk and token. With a ``cache_key`` (one per loaded study or
    image) the encoded images are kept in ``shared.features`` and later questions reuse them.
    """
    from longllava.session import LongContextSession

    session = LongContextSession(shared.model, shared.processor, progress=progress)
    features = shared.features.get(cache_key)
    if features is None:
        features = session.encode_images(list(images), total=len(images))
        shared.features.put(cache_key, features)
    else:
        LOG.info("reusing the encoded images of this study (%d images)", len(features))
    yield from session.generate(list(messages), max_new_tokens=max_new_tokens, stream=True,
                                image_features=features)
