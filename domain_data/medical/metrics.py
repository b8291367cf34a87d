"""Scores for CT-RATE multi-abnormality classification and closed-question medical VQA.

CT-RATE (our definition, stated explicitly because papers differ):

* per abnormality, on binary labels: accuracy = (TP + TN) / N; precision, recall and F1 of the
  **positive class** (F1 = 2PR / (P + R); 0 when undefined);
* macro = the unweighted mean over the 18 abnormalities of each per-class figure;
* ``f1_of_macro_pr`` = 2 P R / (P + R) of the macro precision and recall: the relation LongLLaVA's
  table satisfies (CT-CLIP 73.8 / 30.4 -> 43.0);
* ``ctclip_weighted_f1``: sklearn ``f1_score(average="weighted")`` per abnormality (both classes,
  weighted by support, as CT-CLIP's code does), macro-averaged; shown for comparison only.

Probabilities are turned into labels with per-abnormality thresholds chosen on a **separate** split
(:func:`choose_thresholds`), never on the split being scored.

Closed VQA follows HuatuoGPT-Vision's matching: an option letter in the answer, else an option text
contained in the answer, else the option closest to the answer (difflib ratio).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from domain_data.medical.constants import CT_RATE_ABNORMALITIES
from domain_data.medical.errors import MedicalDatasetError

__all__ = [
    "CT_RATE_ABNORMALITIES",
    "apply_thresholds",
    "choose_thresholds",
    "closed_vqa_accuracy",
    "ct_rate_scores",
    "ct_rate_scores_from_probabilities",
    "match_option",
    "parse_findings",
    "parse_yes_no",
]


LabelsLike = np.ndarray | Sequence[Sequence[int]] | Sequence[Mapping[str, int]]


def _as_matrix(labels: LabelsLike, name: str) -> np.ndarray:
    """(n_studies, 18) int array from an array or a list of {abnormality: 0/1} dicts."""
    if len(labels) and isinstance(labels[0], Mapping):
        missing = [a for a in CT_RATE_ABNORMALITIES if a not in labels[0]]
        if missing:
            raise MedicalDatasetError(f"{name}: label dicts lack {missing[:3]}...; use CT_RATE_ABNORMALITIES names")
        labels = [[int(row[a]) for a in CT_RATE_ABNORMALITIES] for row in labels]
    matrix = np.asarray(labels)
    if matrix.ndim != 2 or matrix.shape[1] != len(CT_RATE_ABNORMALITIES):
        raise MedicalDatasetError(f"{name}: expected shape (n, {len(CT_RATE_ABNORMALITIES)}), got {matrix.shape}")
    if not np.isin(matrix, (0, 1)).all():
        raise MedicalDatasetError(f"{name}: labels must be 0 or 1 (threshold probabilities first)")
    return matrix.astype(int)


def ct_rate_scores(y_true: LabelsLike, y_pred: LabelsLike) -> dict:
    """Per-abnormality and macro accuracy, positive-class precision/recall/F1, CT-CLIP weighted F1.

    Returns ``{"per_abnormality": {name: {accuracy, precision, recall, f1, ctclip_weighted_f1, support}},
    "macro": {accuracy, precision, recall, f1, f1_of_macro_pr, ctclip_weighted_f1}, "n": n,
    "definition": str}``.
    """
    truth, pred = _as_matrix(y_true, "y_true"), _as_matrix(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise MedicalDatasetError(f"y_true {truth.shape} and y_pred {pred.shape} differ in shape")
    per: dict[str, dict[str, float]] = {}
    for column, name in enumerate(CT_RATE_ABNORMALITIES):
        t, p = truth[:, column], pred[:, column]
        precision, recall, f1, _ = precision_recall_fscore_support(
            t, p, labels=[1], average=None, zero_division=0
        )
        per[name] = {
            "accuracy": float(accuracy_score(t, p)),
            "precision": float(precision[0]),
            "recall": float(recall[0]),
            "f1": float(f1[0]),
            "ctclip_weighted_f1": float(f1_score(t, p, labels=[0, 1], average="weighted", zero_division=0)),
            "support": int(t.sum()),
        }
    macro = {key: float(np.mean([v[key] for v in per.values()]))
             for key in ("accuracy", "precision", "recall", "f1", "ctclip_weighted_f1")}
    p, r = macro["precision"], macro["recall"]
    macro["f1_of_macro_pr"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"per_abnormality": per, "macro": macro, "n": int(truth.shape[0]),
            "definition": "positive-class P/R/F1 per abnormality, macro = mean over 18; accuracy = (TP+TN)/N"}


def choose_thresholds(y_true_tune: LabelsLike, probabilities_tune: np.ndarray,
                      candidates: np.ndarray | None = None) -> np.ndarray:
    """Per-abnormality threshold maximising positive-class F1 on a tuning split (not the scored one).

    Ties go to the threshold closest to 0.5. Returns an (18,) array.
    """
    truth = _as_matrix(y_true_tune, "y_true_tune")
    probs = np.asarray(probabilities_tune, dtype=np.float64)
    if probs.shape != truth.shape:
        raise MedicalDatasetError(f"probabilities {probs.shape} and labels {truth.shape} differ in shape")
    grid = np.linspace(0.01, 0.99, 99) if candidates is None else np.asarray(candidates, dtype=np.float64)
    order = np.argsort(np.abs(grid - 0.5), kind="stable")  # prefer thresholds near 0.5 on ties
    grid = grid[order]
    predicted = probs[None, :, :] >= grid[:, None, None]  # (thresholds, n, 18)
    positives = truth[None, :, :] == 1
    tp = (predicted & positives).sum(axis=1)  # (thresholds, 18)
    fp = (predicted & ~positives).sum(axis=1)
    fn = (~predicted & positives).sum(axis=1)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(tp.shape), where=(2 * tp + fp + fn) > 0)
    thresholds = grid[np.argmax(f1, axis=0)]  # first maximum = closest to 0.5
    return thresholds


def apply_thresholds(probabilities: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """0/1 labels: probability >= threshold (per abnormality or one for all)."""
    return (np.asarray(probabilities, dtype=np.float64) >= np.asarray(thresholds)).astype(int)


def ct_rate_scores_from_probabilities(y_true_tune: LabelsLike, probabilities_tune: np.ndarray,
                                      y_true_test: LabelsLike, probabilities_test: np.ndarray) -> dict:
    """Thresholds tuned on the tuning split, then :func:`ct_rate_scores` on the test split."""
    if probabilities_tune is probabilities_test:
        raise MedicalDatasetError("the tuning and the scored probabilities are the same array: tune the "
                                  "thresholds on a separate split (e.g. part of train)")
    thresholds = choose_thresholds(y_true_tune, probabilities_tune)
    scores = ct_rate_scores(y_true_test, apply_thresholds(probabilities_test, thresholds))
    scores["thresholds"] = {name: float(t) for name, t in zip(CT_RATE_ABNORMALITIES, thresholds)}
    return scores


# ------------------------------------------------------------------------------- report parsing

# Finding mentions per abnormality (lower case, matched on word boundaries).
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "Medical material": ("medical material", "stent", "pacemaker", "catheter", "prosthe", "surgical clip",
                         "sternotomy wire", "port catheter", "endotracheal tube"),
    "Arterial wall calcification": ("arterial wall calcification", "aortic calcification",
                                    "atherosclerotic calcification", "calcific atheroma",
                                    "calcified atheroma", "vascular calcification", "aortic wall calcification"),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart", "heart is enlarged", "cardiac enlargement",
                     "heart size is increased", "increased heart size"),
    "Pericardial effusion": ("pericardial effusion", "pericardial fluid"),
    "Coronary artery wall calcification": ("coronary artery wall calcification", "coronary calcification",
                                           "coronary artery calcification", "calcified coronary"),
    "Hiatal hernia": ("hiatal hernia", "hiatus hernia"),
    "Lymphadenopathy": ("lymphadenopathy", "enlarged lymph node", "lymph node enlargement",
                        "pathologically enlarged lymph", "enlarged mediastinal lymph"),
    "Emphysema": ("emphysema", "emphysematous"),
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Lung nodule": ("lung nodule", "pulmonary nodule", "nodule", "nodular lesion"),
    "Lung opacity": ("lung opacity", "opacity", "opacities", "ground glass", "ground-glass"),
    "Pulmonary fibrotic sequela": ("pulmonary fibrotic sequela", "fibrotic sequela", "fibrotic change",
                                   "fibrosis", "fibrotic"),
    "Pleural effusion": ("pleural effusion", "pleural fluid"),
    "Mosaic attenuation pattern": ("mosaic attenuation", "mosaic pattern"),
    "Peribronchial thickening": ("peribronchial thickening", "peribronchial wall thickening",
                                 "bronchial wall thickening"),
    "Consolidation": ("consolidation", "consolidative"),
    "Bronchiectasis": ("bronchiectasis", "bronchiectatic"),
    "Interlobular septal thickening": ("interlobular septal thickening", "septal thickening"),
}

# Findings also recognised when two words share a clause: (site pattern, finding pattern).
CO_OCCURRENCE: dict[str, tuple[str, str]] = {
    "Arterial wall calcification": (r"\baort|\barterial\b|\bcarotid|\biliac|\bfemoral|\bsubclavian",
                                    r"calcif|atheroscl|atherom|\bplaques?\b"),
    "Coronary artery wall calcification": (r"\bcoronar", r"calcif|atheroscl|atherom|\bplaques?\b"),
    "Lymphadenopathy": (r"\blymph\s+nodes?\b", r"\benlarge|\bpatholog"),
}

NEGATION_CUES = (
    "no", "not", "without", "absence of", "absent", "negative for", "free of", "ruled out", "rule out",
    "no evidence of", "no sign of", "no signs of", "neither", "nor", "none", "unremarkable", "resolved",
    "there is no", "there are no", "were not", "was not", "is not", "are not",
)
_NEGATION_RE = re.compile(r"\b(" + "|".join(re.escape(c) for c in sorted(NEGATION_CUES, key=len, reverse=True))
                          + r")\b")
# Negation that follows the mention inside its clause: "pleural effusion was not detected".
_POST_NEGATION_RE = re.compile(
    r"\b(?:is|are|was|were)\s+(?:not|absent)\b|\bnot\s+(?:seen|observed|detected|identified|present|evident|"
    r"noted|found|visualized|visualised)\b|\b(?:is|are|was|were)\s+(?:excluded|ruled out)\b")
_CLAUSE_SPLIT = re.compile(r"[.;\n]|\bbut\b|\bhowever\b|\balthough\b")
_YES_RE = re.compile(r"^\W*(yes|present|positive|true)\b", re.IGNORECASE)
_NO_RE = re.compile(r"^\W*(no|absent|negative|false|none)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> int | None:
    """1 / 0 for an answer that starts with yes / no (present, positive / absent, negative), else None."""
    if _YES_RE.search(text):
        return 1
    if _NO_RE.search(text):
        return 0
    return None


def parse_findings(text: str) -> dict[str, int]:
    """0/1 per CT-RATE abnormality from generated text (report or answers).

    Rules, in order, per abnormality:

    1. a line ``<abnormality name>: yes|no`` (or ``-``/``=``; present/absent, positive/negative) sets it;
    2. otherwise the text is cut into clauses (``.``, ``;``, newline, "but", "however", "although");
       a clause mentioning one of the abnormality's terms (:data:`FINDING_TERMS`) counts as positive
       unless a negation cue (:data:`NEGATION_CUES`) occurs *before* the mention in that clause
       ("no pleural effusion", "without consolidation", "there is no evidence of emphysema") or a
       negated verb follows it ("pleural effusion was not detected", "nodules are not seen");
       a few findings are also recognised from a site and a finding word in one clause
       (:data:`CO_OCCURRENCE`: "calcified plaques in the aorta and coronary arteries");
    3. the abnormality is 1 when at least one mention is positive, else 0.

    Commas do not split clauses, so a negation distributes over a list ("no effusion, consolidation
    or emphysema"); the price is that "no effusion, cardiomegaly" also negates cardiomegaly.
    Mentions of a more specific term are not double counted: "coronary artery calcification" does not
    count as "arterial wall calcification", and "pleural effusion" is not "pericardial effusion".
    """
    lowered = text.lower()
    labels = {name: 0 for name in CT_RATE_ABNORMALITIES}
    explicit = _explicit_answers(lowered)
    for clause in _CLAUSE_SPLIT.split(lowered):
        for name, terms in FINDING_TERMS.items():
            if name in explicit:
                continue
            if _positive_mention(clause, terms, name):
                labels[name] = 1
    labels.update(explicit)
    return labels


def _explicit_answers(lowered: str) -> dict[str, int]:
    answers: dict[str, int] = {}
    for name in CT_RATE_ABNORMALITIES:
        match = re.search(rf"{re.escape(name.lower())}\s*[:=\-]\s*(\w+)", lowered)
        if match:
            value = parse_yes_no(match.group(1))
            if value is not None:
                answers[name] = value
    return answers


def _mentions(clause: str, terms: tuple[str, ...], name: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each mention of the abnormality in ``clause``."""
    for term in terms:
        for match in re.finditer(rf"\b{re.escape(term)}", clause):
            if not _shadowed(clause, match.start(), name):
                yield match.start(), match.end()
    if name in CO_OCCURRENCE:
        site, finding = (re.search(p, clause) for p in CO_OCCURRENCE[name])
        if site and finding:
            yield min(site.start(), finding.start()), max(site.end(), finding.end())


def _positive_mention(clause: str, terms: tuple[str, ...], name: str) -> bool:
    for start, end in _mentions(clause, terms, name):
        negated_before = _NEGATION_RE.search(clause[:start])
        negated_after = _POST_NEGATION_RE.search(clause[end:])
        if not negated_before and not negated_after:
            return True
    return False


def _shadowed(clause: str, start: int, name: str) -> bool:
    """True when the mention at ``start`` is part of a more specific abnormality's phrase."""
    window = clause[max(0, start - 20) : start + 40]
    if name == "Arterial wall calcification" and "coronary" in window:
        return True
    if name == "Lung nodule" and re.search(r"lymph\s+nod|nodular lesion of the thyroid", window):
        return True
    if name in ("Lung opacity",) and "consolidat" in window and "opacit" not in window:
        return True
    return False


# ----------------------------------------------------------------------------------- closed VQA

_LETTER_RES = (
    # "the answer is (B)", "Option: C", "choice B" - the letter itself must be upper case
    re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?\b([A-Z])\b\)?(?![\w'])"),
    # the answer starts with a bare letter: "B", "B.", "(B)", "B)", "B:"
    re.compile(r"^\s*\(?([A-Z])(?:\)|\.|:|\s*$)"),
    # a parenthesised letter anywhere: "... (C) ..."
    re.compile(r"\(([A-Z])\)"),
)


def match_option(answer: str, options: Sequence[str]) -> int:
    """Index of the option an answer picks (HuatuoGPT-Vision's order of rules).

    1. an option letter (A, B, ...): "B", "(B)", "B.", "the answer is B";
    2. else an option's text appearing as whole words in the answer (the first mentioned wins);
    3. else the option closest to the answer (difflib ratio, case-insensitive).
    """
    if not options:
        raise MedicalDatasetError("a closed question needs at least one option")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for pattern in _LETTER_RES:
        match = pattern.search(answer)
        if match and match.group(1).upper() in letters:
            return letters.index(match.group(1).upper())
    lowered = answer.lower()
    found = [(match.start(), -len(option), i) for i, option in enumerate(options) if option.strip()
             for match in [re.search(rf"(?<!\w){re.escape(option.lower().strip())}(?!\w)", lowered)] if match]
    if found:
        return min(found)[2]  # the option mentioned first; the longest one on a tie
    ratios = [difflib.SequenceMatcher(None, lowered, option.lower()).ratio() for option in options]
    return int(np.argmax(ratios))


def closed_vqa_accuracy(answers: Sequence[str], options: Sequence[Sequence[str]],
                        correct: Sequence[str | int]) -> dict:
    """Accuracy of generated answers on closed questions; ``correct`` is the option text or its index.

    Returns ``{"accuracy", "n", "correct", "matched": [chosen option index per item]}``.
    """
    if not (len(answers) == len(options) == len(correct)):
        raise MedicalDatasetError(f"answers ({len(answers)}), options ({len(options)}) and correct "
                                  f"({len(correct)}) must have the same length")
    chosen, hits = [], 0
    for answer, opts, truth in zip(answers, options, correct):
        index = match_option(answer, opts)
        truth_index = truth if isinstance(truth, int) else _option_index(truth, opts)
        chosen.append(index)
        hits += int(index == truth_index)
    n = len(answers)
    return {"accuracy": hits / n if n else 0.0, "n": n, "correct": hits, "matched": chosen}


def _option_index(truth: str, options: Sequence[str]) -> int:
    lowered = [o.strip().lower() for o in options]
    if truth.strip().lower() not in lowered:
        raise MedicalDatasetError(f"correct answer {truth!r} is not one of the options {list(options)}")
    return lowered.index(truth.strip().lower())
