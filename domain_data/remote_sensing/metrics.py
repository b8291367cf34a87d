"""FIT-RSFG-Bench scores, exactly as the official SkySenseGPT scripts compute them, plus a lenient variant.

Official rules (``Eval_scripts/batch_geochat_vqa.py`` and ``batch_geochat_sceneclassification.py``):

* VQA: an answer is right when ``ground_truth.lower() == answer.strip().lower()`` (the scripts strip
  the generated text before writing it, then compare lowercased strings). Accuracy per category
  (category lowercased) and overall = all correct / all questions (micro).
* Scene classification: the question's ending decides the mode. "Answer in one word or a short
  phrase." -> single label, exact match as above. "Answer with all applicable classes separated by
  commas." -> multi label: both texts are lowercased, split on ``,`` and each label stripped;
  true/false positives and false negatives of the two label sets are summed over all questions and
  give micro precision, recall and F1. (An empty label from a trailing comma counts, as it does in
  the official script.)

The lenient variant is reported beside the official one, never instead of it. It compares
:func:`lenient_normalize` forms: Unicode NFKC, lowercase, punctuation (including ``_`` and ``-``)
turned into spaces except a ``.`` or ``,`` between two digits, the articles ``a``, ``an``, ``the``
dropped, number words zero..twenty written as digits, whitespace collapsed. Multi-label answers are
split on commas before normalising and empty labels are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from domain_data.remote_sensing.errors import DatasetInputError

SINGLE_LABEL_SUFFIX = "Answer in one word or a short phrase."
MULTI_LABEL_SUFFIX = "Answer with all applicable classes separated by commas."
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[^\w\s.,]|_")


def official_vqa_correct(ground_truth: str, answer: str) -> bool:
    """The official FIT-RSFG rule: ``ground_truth.lower() == answer.strip().lower()``."""
    return ground_truth.lower() == answer.strip().lower()


def lenient_normalize(text: str) -> str:
    """The lenient comparison form (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words if word not in _ARTICLES)


def lenient_vqa_correct(ground_truth: str, answer: str) -> bool:
    return lenient_normalize(ground_truth) == lenient_normalize(answer)


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"accuracy": self.value, "correct": self.correct, "total": self.total}


@dataclass(frozen=True)
class PRF1:
    tp: int
    fp: int
    fn: int
    questions: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_dict(self) -> dict:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                "tp": self.tp, "fp": self.fp, "fn": self.fn, "questions": self.questions}


def _field(record: Mapping, key: str, index: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DatasetInputError(f"scoring item {index} (question_id {record.get('question_id')!r}): "
                                f"'{key}' must be text, got {type(value).__name__}")
    return value


def _accuracy_table(records: list[Mapping], rule) -> dict:
    per_category: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        category = _field(record, "category", index).lower()
        right = rule(_field(record, "ground_truth", index), _field(record, "answer", index))
        counts = per_category.setdefault(category, [0, 0])
        counts[0] += int(right)
        counts[1] += 1
    correct = sum(c for c, _ in per_category.values())
    total = sum(t for _, t in per_category.values())
    return {"overall": Accuracy(correct, total),
            "per_category": {cat: Accuracy(c, t) for cat, (c, t) in sorted(per_category.items())}}


def fitrsfg_vqa_scores(records: Iterable[Mapping]) -> dict:
    """VQA accuracy, official and lenient, overall (micro) and per category.

    ``records``: mappings with ``ground_truth``, ``answer`` and ``category`` (an answers JSONL row).
    Returns ``{"official": {"overall": Accuracy, "per_category": {...}}, "lenient": {...}}``.
    """
    rows = list(records)
    if not rows:
        raise DatasetInputError("no answers to score")
    return {"official": _accuracy_table(rows, official_vqa_correct),
            "lenient": _accuracy_table(rows, lenient_vqa_correct)}


def scene_mode(question: str) -> str:
    """``single`` or ``multi`` from the question's ending, as the official script decides."""
    if question.endswith(SINGLE_LABEL_SUFFIX):
        return "single"
    if question.endswith(MULTI_LABEL_SUFFIX):
        return "multi"
    raise DatasetInputError(f"scene-classification question {question[-80:]!r} ends with neither "
                            f"{SINGLE_LABEL_SUFFIX!r} nor {MULTI_LABEL_SUFFIX!r}; cannot tell single- from multi-label")


def _official_labels(text: str) -> set[str]:
    return {label.strip() for label in text.lower().split(",")}


def _lenient_labels(text: str) -> set[str]:
    return {form for form in (lenient_normalize(label) for label in text.split(",")) if form}


def _scene_table(rows: list[Mapping], single_rule, labels) -> dict:
    correct = total = tp = fp = fn = multi = 0
    for index, row in enumerate(rows):
        question = row.get("question", row.get("text"))
        if not isinstance(question, str):
            raise DatasetInputError(f"scoring item {index}: scene classification needs the question text "
                                    "('question' or 'text') to tell single- from multi-label")
        truth, answer = _field(row, "ground_truth", index), _field(row, "answer", index)
        if scene_mode(question) == "single":
            correct += int(single_rule(truth, answer))
            total += 1
        else:
            gt_set, answer_set = labels(truth), labels(answer)
            tp += len(gt_set & answer_set)
            fp += len(answer_set - gt_set)
            fn += len(gt_set - answer_set)
            multi += 1
    return {"single": Accuracy(correct, total), "multi": PRF1(tp, fp, fn, multi)}


def scene_classification_scores(records: Iterable[Mapping]) -> dict:
    """Single-label exact-match accuracy and multi-label micro P/R/F1, official and lenient.

    ``records``: mappings with ``question`` (or ``text``), ``ground_truth`` and ``answer``.
    """
    rows = list(records)
    if not rows:
        raise DatasetInputError("no answers to score")
    return {"official": _scene_table(rows, official_vqa_correct, _official_labels),
            "lenient": _scene_table(rows, lenient_vqa_correct, _lenient_labels)}


COUNT_CONFUSION_DEFINITION = (
    "questions of a category whose name contains 'count' and whose ground truth is a whole number; an answer is "
    "read as the first whole number of its lenient form (number words as digits), 'none' when it has none; a "
    "diagnostic beside the official per-category accuracy, not a score of the benchmark")


def read_count(text: str) -> int | None:
    """The first whole number of ``text``'s lenient form (``"Three ships."`` -> 3), None when there is none."""
    return next((int(word) for word in lenient_normalize(text).split() if word.isascii() and word.isdigit()), None)


def count_confusion(records: Iterable[Mapping]) -> dict | None:
    """True count x count answered, over the counting questions of ``records`` (answers JSONL rows with
    ``category``, ``ground_truth`` and ``answer``); None when there are none (see
    :data:`COUNT_CONFUSION_DEFINITION`).

    Returns ``{"truths": [t, ...], "answers": ["0", ..., "none"] (every truth and every count read),
    "matrix": [[questions]] (truths x answers),
    "per_truth": {"t": Accuracy dict}, "mean_absolute_error" (over the answers read), "unread",
    "questions", "left_out" (counting questions whose ground truth is not a whole number), "definition"}``.
    """
    pairs: list[tuple[int, int | None]] = []
    left_out = 0
    for index, record in enumerate(records):
        if "count" not in _field(record, "category", index).lower():
            continue
        truth = lenient_normalize(_field(record, "ground_truth", index))
        if not (truth.isascii() and truth.isdigit()):
            left_out += 1
            continue
        pairs.append((int(truth), read_count(_field(record, "answer", index))))
    if not pairs:
        return None
    truths = sorted({t for t, _ in pairs})
    answers = [str(a) for a in sorted({a for _, a in pairs if a is not None} | set(truths))]  # the diagonal kept
    answers += ["none"] * any(a is None for _, a in pairs)
    matrix = [[0] * len(answers) for _ in truths]  # (truths, answers)
    for truth, answer in pairs:
        matrix[truths.index(truth)][answers.index("none" if answer is None else str(answer))] += 1
    read = [(t, a) for t, a in pairs if a is not None]
    per_truth = {str(t): Accuracy(row[answers.index(str(t))], sum(row)).to_dict() for t, row in zip(truths, matrix)}
    return {"truths": truths, "answers": answers, "matrix": matrix, "per_truth": per_truth,
            "mean_absolute_error": sum(abs(t - a) for t, a in read) / len(read) if read else None,
            "unread": len(pairs) - len(read), "questions": len(pairs), "left_out": left_out,
            "definition": COUNT_CONFUSION_DEFINITION}


def scores_to_dict(scores: object) -> object:
    """Turn a scores result (nested dicts of Accuracy / PRF1) into plain JSON-able dicts."""
    if isinstance(scores, dict):
        return {key: scores_to_dict(value) for key, value in scores.items()}
    if isinstance(scores, Accuracy | PRF1):
        return scores.to_dict()
    return scores
