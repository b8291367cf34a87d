"""PubMedVision (HuatuoGPT-Vision): LLaVA-style conversations over 1-29 medical images per row.

Rows: ``{"id", "image": [relative paths], "body_part", "modality", "conversations": [{"from": "human",
"value"}, {"from": "gpt", "value"}]}``. The human turn carries no ``<image>`` token: one is inserted per
image (as ``<image>\\n`` lines before the first human text), so the count always equals the images.
Files may be a JSON list or JSON lines. Images are not opened until :meth:`PubMedVisionRecord.open_images`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from domain_data.medical.errors import MedicalDatasetError
from longllava.protocol import IMAGE_TOKEN, count_images

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class PubMedVisionRecord:
    """One PubMedVision sample with ``<image>`` tokens in place."""

    id: str
    image_paths: list[Path]
    body_part: str
    modality: str
    conversations: list[dict[str, str]] = field(default_factory=list)  # [{from, value}]

    def messages(self) -> list[dict[str, str]]:
        """``[{role, content}]`` for :func:`longllava.protocol.render_conversation`."""
        return [{"role": _ROLES[turn["from"]], "content": turn["value"]} for turn in self.conversations]

    def open_images(self) -> list[Image.Image]:
        missing = [str(p) for p in self.image_paths if not p.is_file()]
        if missing:
            raise MedicalDatasetError(f"PubMedVision {self.id}: image file(s) not found: {', '.join(missing[:3])}")
        return [Image.open(p).convert("RGB") for p in self.image_paths]


def insert_image_tokens(conversations: list[dict[str, str]], n_images: int, record_id: str = "?",
                        ) -> list[dict[str, str]]:
    """Copy of ``conversations`` whose first human turn holds exactly ``n_images`` ``<image>`` tokens.

    A turn without tokens gets ``n_images`` lines ``<image>`` prepended; a conversation that already has
    tokens is kept when the count matches and refused otherwise.
    """
    turns = [dict(turn) for turn in conversations]
    present = sum(count_images(t.get("value", "")) for t in turns)
    if present == n_images:
        return turns
    if present:
        raise MedicalDatasetError(f"PubMedVision {record_id}: {present} <image> token(s) for {n_images} image(s)")
    first_human = next((t for t in turns if t.get("from") in ("human", "user")), None)
    if first_human is None:
        raise MedicalDatasetError(f"PubMedVision {record_id}: no human turn to attach the images to")
    first_human["value"] = f"{IMAGE_TOKEN}\n" * n_images + first_human["value"]
    return turns


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise MedicalDatasetError(f"PubMedVision file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise MedicalDatasetError(f"{path}: not valid JSON / JSON lines ({error})") from None


class PubMedVisionDataset:
    """Rows of one PubMedVision JSON file; image paths resolved against ``image_root``."""

    def __init__(self, json_path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if not self.image_root.is_dir():
            raise MedicalDatasetError(f"PubMedVision image folder not found: {self.image_root}")
        self._rows = _read_rows(self.path)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> PubMedVisionRecord:
        row = self._rows[index]
        record_id = str(row.get("id", index))
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        if not images or "conversations" not in row:
            raise MedicalDatasetError(f"{self.path}: row {record_id} lacks 'image' or 'conversations'")
        for turn in row["conversations"]:
            if turn.get("from") not in _ROLES:
                raise MedicalDatasetError(f"{self.path}: row {record_id} has a turn from {turn.get('from')!r}")
        return PubMedVisionRecord(
            id=record_id,
            image_paths=[self.image_root / p for p in images],
            body_part=str(row.get("body_part", "")),
            modality=str(row.get("modality", "")),
            conversations=insert_image_tokens(row["conversations"], len(images), record_id),
        )

    def __iter__(self) -> Iterator[PubMedVisionRecord]:
        for index in range(len(self)):
            yield self[index]
