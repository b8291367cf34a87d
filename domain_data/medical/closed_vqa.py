"""Closed (multiple-choice / yes-no) medical VQA: VQA-RAD, PathVQA, SLAKE as HuatuoGPT-Vision scores them.

Two input formats, detected per row:

* HuatuoGPT-Vision's evaluation JSON: ``{"question", "options": [...], "answer", "image": [...] | str,
  "dataset"}`` (``answer`` is an option text or its letter);
* the original releases' JSON (VQA-RAD ``image_name``/``answer_type``; SLAKE ``img_name``/``answer_type``/
  ``q_lang``; PathVQA exported to the same keys): only ``answer_type == "CLOSED"`` rows are kept; yes/no
  answers get options ``["yes", "no"]``, "A or B" questions get ``[A, B]``; other closed rows are skipped
  and counted in :attr:`ClosedVQADataset.skipped`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from domain_data.medical.errors import MedicalDatasetError

# "X or Y" with one- or two-word alternatives: "left or right", "CT or MRI", "T1 or T2 weighted"
_OR_RES = (
    re.compile(r"([\w\-]+)\s+or\s+([\w\-]+)", re.IGNORECASE),
    re.compile(r"([\w\-]+ [\w\-]+)\s+or\s+([\w\-]+ [\w\-]+)", re.IGNORECASE),
)


@dataclass(frozen=True)
class ClosedVQARecord:
    """A closed question on one or more images."""

    question_id: str
    dataset: str
    image_paths: tuple[Path, ...]
    question: str
    options: tuple[str, ...]
    answer: str  # the correct option text

    def prompt(self) -> str:
        """Question with lettered options (HuatuoGPT-Vision style)."""
        letters = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(self.options))
        return f"{self.question}\n{letters}\nAnswer with the option's letter from the given choices directly."

    @property
    def answer_index(self) -> int:
        return [o.lower() for o in self.options].index(self.answer.lower())


def _options_from_raw(question: str, answer: str) -> tuple[str, ...] | None:
    if answer.lower() in ("yes", "no"):
        return ("yes", "no")
    for pattern in _OR_RES:
        for match in pattern.finditer(question.strip().rstrip("?")):
            options = (match.group(1).strip(), match.group(2).strip())
            if answer.lower() in (o.lower() for o in options):
                return options
    return None


class ClosedVQADataset:
    """Closed questions of one JSON file; images resolved against ``image_root``."""

    def __init__(self, json_path: str | Path, image_root: str | Path | None = None, dataset: str = "") -> None:
        self.path = Path(json_path)
        if not self.path.is_file():
            raise MedicalDatasetError(f"closed-VQA file not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        if not self.image_root.is_dir():
            raise MedicalDatasetError(f"closed-VQA image folder not found: {self.image_root}")
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise MedicalDatasetError(f"{self.path}: not valid JSON ({error})") from None
        if not isinstance(rows, list):
            raise MedicalDatasetError(f"{self.path}: expected a JSON list of questions")
        self.dataset = dataset or self.path.stem
        self.skipped = 0
        self._records = [r for r in (self._record(i, row) for i, row in enumerate(rows)) if r is not None]

    def _record(self, index: int, row: dict) -> ClosedVQARecord | None:
        question = str(row.get("question", "")).strip()
        answer = str(row.get("answer", "")).strip()
        if "options" in row:
            options = tuple(str(o) for o in row["options"])
            if len(answer) == 1 and answer.isalpha() and answer.upper() < chr(ord("A") + len(options)):
                answer = options[ord(answer.upper()) - ord("A")]
            if answer.lower() not in (o.lower() for o in options):
                raise MedicalDatasetError(f"{self.path}: row {index}: answer {answer!r} not among options {options}")
        else:
            if str(row.get("answer_type", "")).upper() != "CLOSED" or row.get("q_lang", "en") != "en":
                return None
            options = _options_from_raw(question, answer)
            if options is None:
                self.skipped += 1
                return None
        images = row.get("image") or row.get("image_name") or row.get("img_name") or []
        images = [images] if isinstance(images, str) else list(images)
        return ClosedVQARecord(
            question_id=str(row.get("qid", row.get("question_id", row.get("id", index)))),
            dataset=str(row.get("dataset", self.dataset)),
            image_paths=tuple(self.image_root / p for p in images),
            question=question,
            options=options,
            answer=next(o for o in options if o.lower() == answer.lower()),
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> ClosedVQARecord:
        return self._records[index]

    def __iter__(self) -> Iterator[ClosedVQARecord]:
        return iter(self._records)
