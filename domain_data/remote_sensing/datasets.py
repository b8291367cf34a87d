"""SkySenseGPT / FIT-RS training conversations and FIT-RSFG-Bench evaluation files, as typed records.

* FIT-RS training JSON (LLaVA style): a JSON list (or JSON Lines) of
  ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}``.
* FIT-RSFG-Bench (``test_FITRS_vqa_eval.jsonl``, ``test_FITRS_imageclassify_eval.jsonl``, ...): JSON
  Lines of ``{"question_id", "image", "text" (or "question"), "category", "ground_truth"}``.

Images are 512 x 512 STAR crops named ``{STAR id}__512__{x}___{y}.png``; relative image paths are
resolved against ``image_root`` (default: the annotation file's folder). Missing files are reported
together, in one error that names the first few and says what to pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from domain_data.remote_sensing.errors import DatasetInputError

SPEAKER_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_STAR_CROP = re.compile(r"^(?P<star_id>.+?)__(?P<size>\d+)__(?P<x>\d+)___(?P<y>\d+)\.(?:png|jpg|jpeg|tif|tiff)$",
                        re.IGNORECASE)
MISSING_SHOWN = 3


@dataclass(frozen=True)
class Turn:
    """One conversation turn: ``speaker`` is ``human``, ``gpt`` or ``system`` (FIT-RS names)."""

    speaker: str
    text: str


@dataclass(frozen=True)
class FitRsConversation:
    """One FIT-RS / SkySenseGPT training record."""

    id: str
    image: Path | None
    turns: tuple[Turn, ...]

    def messages(self) -> list[dict]:
        """``[{role, content}]`` with roles user/assistant/system, for the chat template."""
        return [{"role": SPEAKER_ROLES[turn.speaker], "content": turn.text} for turn in self.turns]


@dataclass(frozen=True)
class FitRsfgBenchItem:
    """One FIT-RSFG-Bench question. ``question_id`` is kept as text (ids are ints in some files)."""

    question_id: str
    image: Path
    question: str
    category: str
    ground_truth: str


@dataclass(frozen=True)
class StarCrop:
    """Where a FIT-RS image was cut from its STAR scene: ``{star_id}__{size}__{x}___{y}.png``."""

    star_id: str
    size: int
    x: int
    y: int


def parse_star_crop_name(name: str | os.PathLike) -> StarCrop | None:
    """The STAR scene id and crop offset in a FIT-RS image name, or None if it is not one."""
    match = _STAR_CROP.match(Path(name).name)
    if not match:
        return None
    return StarCrop(match["star_id"], int(match["size"]), int(match["x"]), int(match["y"]))


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DatasetInputError(f"{path}: no such {what} file; check the path")
    if path.is_dir():
        raise DatasetInputError(f"{path} is a folder; give the {what} file inside it")


def _iter_json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, record) for a JSON list or a JSON Lines file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DatasetInputError(f"{path} is empty; expected JSON records")
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DatasetInputError(f"{path} is not valid JSON ({error}); fix or re-download it") from error
        for index, record in enumerate(records):
            yield f"{path} record {index}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetInputError(f"{path} line {number} is not valid JSON ({error.msg}); fix or remove it") from error
        yield f"{path} line {number}", record


def _require(record: object, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(record, dict):
        raise DatasetInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DatasetInputError(f"{where}: missing key(s) {', '.join(missing)} (has: {', '.join(record)})")
    return record


def _resolve(image: str, root: Path) -> Path:
    path = Path(image)
    return path if path.is_absolute() else root / path


def _check_images(paths: list[Path], source: Path, root: Path) -> None:
    missing = sorted({p for p in paths if not p.is_file()})
    if missing:
        shown = ", ".join(str(p) for p in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise DatasetInputError(
            f"{source}: {len(missing)} image(s) not found under {root}: {shown}{more}; pass image_root= the folder "
            "holding the images (e.g. FIT-RS imgv2_split_512_100_vaild), or check_images=False to skip the check"
        )


def _parse_turns(conversations: object, where: str) -> tuple[Turn, ...]:
    if not isinstance(conversations, list) or not conversations:
        raise DatasetInputError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    turns = []
    for index, turn in enumerate(conversations):
        turn = _require(turn, ("from", "value"), f"{where} turn {index}")
        if turn["from"] not in SPEAKER_ROLES:
            raise DatasetInputError(f"{where} turn {index}: speaker {turn['from']!r} is not one of "
                                    f"{', '.join(SPEAKER_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DatasetInputError(f"{where} turn {index}: 'value' must be text")
        turns.append(Turn(turn["from"], turn["value"]))
    if not any(t.speaker == "gpt" for t in turns):
        raise DatasetInputError(f"{where}: no 'gpt' turn, nothing to train on")
    return tuple(turns)


def load_fitrs_conversations(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                             check_images: bool = True) -> list[FitRsConversation]:
    """Read a FIT-RS / SkySenseGPT LLaVA-style training file (JSON list or JSON Lines)."""
    source = Path(path)
    _check_file(source, "FIT-RS training JSON")
    root = Path(image_root) if image_root is not None else source.parent
    records = []
    for where, record in _iter_json_records(source):
        record = _require(record, ("conversations",), where)
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise DatasetInputError(f"{where}: 'image' must be one path (text), got {type(image).__name__}")
        turns = _parse_turns(record["conversations"], where)
        records.append(FitRsConversation(str(record.get("id", len(records))),
                                         _resolve(image, root) if image else None, turns))
    if not records:
        raise DatasetInputError(f"{source} holds no records")
    if check_images:
        _check_images([r.image for r in records if r.image is not None], source, root)
    return records


def load_fitrsfg_bench(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                       check_images: bool = True) -> list[FitRsfgBenchItem]:
    """Read a FIT-RSFG-Bench JSON Lines file (``text`` or ``question`` holds the question)."""
    source = Path(path)
    _check_file(source, "FIT-RSFG-Bench JSONL")
    root = Path(image_root) if image_root is not None else source.parent
    items = []
    for where, record in _iter_json_records(source):
        record = _require(record, ("question_id", "image", "ground_truth"), where)
        question = record.get("text", record.get("question"))
        if not isinstance(question, str):
            raise DatasetInputError(f"{where}: no question text (expected key 'text' or 'question')")
        items.append(FitRsfgBenchItem(str(record["question_id"]), _resolve(str(record["image"]), root), question,
                                      str(record.get("category", "")), str(record["ground_truth"])))
    if not items:
        raise DatasetInputError(f"{source} holds no questions")
    if check_images:
        _check_images([item.image for item in items], source, root)
    return items


def load_answers(path: str | os.PathLike) -> list[dict]:
    """An answers JSONL as the FIT-RSFG scripts write it (``question_id``, ``answer``, ``ground_truth``,
    and ``category`` or ``question``)."""
    source = Path(path)
    _check_file(source, "answers JSONL")
    rows = []
    for where, record in _iter_json_records(source):
        rows.append(_require(record, ("answer", "ground_truth"), where))
    if not rows:
        raise DatasetInputError(f"{source} holds no answers")
    return rows
