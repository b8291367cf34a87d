"""Questions with short canonical answers about phantoms and scenes, reports, and record formats.

Canonical answers are scored by exact match (FIT-RSFG rule: ``ground_truth.lower() ==
answer.strip().lower()``):

* presence: ``Yes`` / ``No``;
* side (patient's side): ``left`` / ``right`` / ``both``;
* slices: ``first-last`` with 1-based slice numbers along z, inferior -> superior (e.g. ``41-57``);
* counts: decimal digits (``0``, ``3``);
* row / column: 1-based, top / left first; several as ``1, 3``; a tile as ``row 2, column 3``.

Each question dict is ``{question, answer, kind}`` plus ``finding`` (CT) or ``object`` (scenes), the
CT-RATE finding name or object kind it is about. Paraphrases are chosen with a seeded generator, so
the same phantom/scene and seed give the same questions.

Records (see :func:`llava_record`, :func:`fitrsfg_item`): LLaVA conversations ``{id, image, layout,
conversations: [{from: human, value: "<image>\\n..."}, {from: gpt, value}]}`` with one ``<image>``
placeholder that stands for the whole study or scene: the data pipeline replaces it with the visual
prompt of the ``layout`` (``series`` for CT slices, ``grid`` for thumbnail + tiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from domain_data.medical.constants import report_answer
from domain_data.synthetic.ct_phantom import LATERAL_FINDINGS, RENDERABLE_FINDINGS, Phantom
from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS, Scene

IMAGE_PLACEHOLDER = "<image>"
SCENE_ROW_QUESTION = "Which row of tiles (1 = top) contains {plural}? Answer with the row number(s)."

_PHRASE = {
    "Lung nodule": ("a lung nodule", "lung nodules"),
    "Pleural effusion": ("a pleural effusion", "the pleural effusion"),
    "Cardiomegaly": ("cardiomegaly", "cardiomegaly"),
    "Emphysema": ("emphysema", "the emphysema"),
    "Consolidation": ("consolidation", "the consolidation"),
}
_PRESENCE_TEMPLATES = (
    "Is there {a} in this CT scan? Answer Yes or No.",
    "Does this chest CT show {a}? Answer Yes or No.",
    "Is there evidence of {a}? Answer Yes or No.",
)
PRESENCE_WORDINGS = len(_PRESENCE_TEMPLATES)


def yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def presence_question(finding: str, template: int) -> str:
    """The presence question about ``finding`` (a :data:`RENDERABLE_FINDINGS` name) in wording number
    ``template`` (modulo :data:`PRESENCE_WORDINGS`): "Is there a pleural effusion in this CT scan? Answer Yes or No."."""
    return _PRESENCE_TEMPLATES[template % PRESENCE_WORDINGS].format(a=_PHRASE[finding][0])


def slice_range_text(slices: tuple[int, int]) -> str:
    """0-based inclusive z range -> canonical 1-based ``first-last``."""
    return f"{slices[0] + 1}-{slices[1] + 1}"


def map_slice_range(answer: str, n_source: int, n_target: int) -> str:
    """Map a ``first-last`` answer from a study of ``n_source`` slices to the same anatomy in a series
    resampled (evenly along z, first and last slice kept) to ``n_target`` slices."""
    try:
        first, last = (int(v) for v in answer.split("-"))
    except ValueError as error:
        raise ValueError(f"slice answer {answer!r} is not 'first-last'") from error
    if n_source < 1 or n_target < 1 or not 1 <= first <= last <= n_source:
        raise ValueError(f"slice answer {answer!r} does not fit a {n_source}-slice study")
    scale = (n_target - 1) / max(n_source - 1, 1)
    return f"{round((first - 1) * scale) + 1}-{round((last - 1) * scale) + 1}"


def ct_questions(phantom: Phantom, seed: int | None = None) -> list[dict[str, str]]:
    """Presence for every renderable finding; side and slices for present ones; the nodule count."""
    rng = np.random.default_rng(phantom.seed if seed is None else seed)
    questions: list[dict[str, str]] = []
    for name in RENDERABLE_FINDINGS:
        finding = phantom.findings[name]
        the = _PHRASE[name][1]
        question = presence_question(name, int(rng.integers(PRESENCE_WORDINGS)))
        questions.append(_q(question, yes_no(finding.present), "presence", finding=name))
        if name == "Lung nodule":
            questions.append(
                _q(
                    "How many lung nodules are there? Answer with a number.",
                    str(finding.count or 0),
                    "count",
                    finding=name,
                )
            )
        if not finding.present:
            continue
        if name in LATERAL_FINDINGS and finding.side:
            where = "are the lung nodules" if name == "Lung nodule" else f"is {the}"
            questions.append(
                _q(
                    f"On which side {where} located? Answer left, right or both.",
                    finding.side,
                    "side",
                    finding=name,
                )
            )
        if finding.slices is not None:
            where = "are the lung nodules" if name == "Lung nodule" else f"is {the}"
            questions.append(
                _q(
                    f"On which slices {where} visible? Answer as first-last slice number.",
                    slice_range_text(finding.slices),
                    "slices",
                    finding=name,
                )
            )
    return questions


def _q(question: str, answer: str, kind: str, **about: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "kind": kind, **about}


def _lungs(side: str) -> str:
    return {"left": "the left lung", "right": "the right lung", "both": "both lungs"}[side]


def ct_report(phantom: Phantom) -> dict[str, str]:
    """A CT-RATE style report: ``{"findings": ..., "impressions": ...}``."""
    f = phantom.findings
    ctr = f["Cardiomegaly"].details.get("cardiothoracic_ratio")
    sentences = ["Trachea and both main bronchi are in the midline and patent."]
    if f["Cardiomegaly"].present:
        sentences.append(
            f"The heart is enlarged (cardiothoracic ratio {ctr:.2f}), consistent with cardiomegaly."
        )
    else:
        sentences.append(f"Heart contour and size are normal (cardiothoracic ratio {ctr:.2f}).")
    effusion = f["Pleural effusion"]
    if effusion.present:
        kind = {"left": "A left-sided", "right": "A right-sided", "both": "Bilateral"}[
            effusion.side or "both"
        ]
        sentences.append(
            f"{kind} pleural effusion is seen posteriorly at the lung base, about "
            f"{effusion.details['volume_ml']:.0f} ml, on slices {slice_range_text(effusion.slices)}."
        )
    else:
        sentences.append("No pleural effusion was detected.")
    emphysema = f["Emphysema"]
    if emphysema.present:
        sentences.append(
            f"Emphysematous low-attenuation areas are seen in the upper parts of {_lungs(emphysema.side)}, "
            f"on slices {slice_range_text(emphysema.slices)}."
        )
    consolidation = f["Consolidation"]
    if consolidation.present:
        sentences.append(
            f"An area of consolidation is present in {_lungs(consolidation.side)}, "
            f"on slices {slice_range_text(consolidation.slices)}."
        )
    else:
        sentences.append("No consolidation was observed.")
    sentences.append(_nodule_sentence(f["Lung nodule"]))
    sentences.append("The bony structures within the imaging field are natural.")
    impressions = _impressions(phantom)
    return {"findings": " ".join(sentences), "impressions": impressions}


def _nodule_sentence(finding) -> str:
    if not finding.present:
        return "No mass or nodule was detected in either lung."
    largest = max(n["radius_mm"] for n in finding.details["nodules"]) * 2
    count = finding.count
    noun = "nodule measuring" if count == 1 else "nodules measuring up to"
    verb = "is" if count == 1 else "are"
    return (
        f"{count} {noun} {largest:.0f} mm {verb} seen in {_lungs(finding.side)}, "
        f"on slices {slice_range_text(finding.slices)}."
    )


def _impressions(phantom: Phantom) -> str:
    items = []
    for name in RENDERABLE_FINDINGS:
        finding = phantom.findings[name]
        if not finding.present:
            continue
        if name == "Cardiomegaly":
            items.append("Cardiomegaly.")
        elif name == "Lung nodule":
            items.append(f"{finding.count} lung nodule{'s' if finding.count != 1 else ''} ({finding.side}).")
        elif name == "Pleural effusion":
            side = "Bilateral" if finding.side == "both" else (finding.side or "").capitalize()
            items.append(f"{side} pleural effusion.")
        else:
            items.append(f"{name} ({_lungs(finding.side or 'both').removeprefix('the ')}).")
    return " ".join(items) if items else "No significant pathology."


def ct_report_text(phantom: Phantom) -> str:
    report = ct_report(phantom)
    return report_answer(report["findings"], report["impressions"])


def ct_report_question(phantom: Phantom) -> dict[str, str]:
    return _q("Write the findings and impressions of this chest CT.", ct_report_text(phantom), "report")


# -------------------------------------------------------------------------------------------- scenes
def _join_numbers(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def count_question_wordings(plural: str) -> tuple[str, str]:
    """The two wordings of a scene's count question about ``plural`` (e.g. ``"storage tanks"``)."""
    return (
        f"How many {plural} are there in the image? Answer with a number.",
        f"Count the {plural} in this image. Answer with a number.",
    )


def scene_questions(
    scene: Scene, tile_size: int | None = None, seed: int | None = None
) -> list[dict[str, str]]:
    """Count and presence for every object kind; row, column and tile of present kinds."""
    size = tile_size or scene.tile_size
    rng = np.random.default_rng(scene.seed if seed is None else seed)
    questions: list[dict[str, str]] = []
    for kind in OBJECT_KINDS:
        plural, count = PLURALS[kind], scene.count(kind)
        wordings = count_question_wordings(plural)
        questions.append(_q(wordings[int(rng.integers(2))], str(count), "count", object=kind))
        questions.append(
            _q(
                f"Is there a {kind} in the image? Answer Yes or No.",
                yes_no(count > 0),
                "presence",
                object=kind,
            )
        )
        if count == 0:
            continue
        tiles = scene.tiles_with(kind, size)
        rows, cols = sorted({r for r, _ in tiles}), sorted({c for _, c in tiles})
        questions.append(
            _q(
                SCENE_ROW_QUESTION.format(plural=plural),
                _join_numbers(rows),
                "row",
                object=kind,
            )
        )
        questions.append(
            _q(
                f"Which column of tiles (1 = left) contains {plural}? Answer with the column number(s).",
                _join_numbers(cols),
                "column",
                object=kind,
            )
        )
        if len(tiles) == 1:
            questions.append(
                _q(
                    f"Which tile contains {plural}? Answer as row R, column C.",
                    f"row {tiles[0][0]}, column {tiles[0][1]}",
                    "tile",
                    object=kind,
                )
            )
    return questions


# ------------------------------------------------------------------------------------------- records
def llava_record(
    record_id: str, image: str, layout: str, qa: Sequence[dict[str, str]], **extra: Any
) -> dict[str, Any]:
    """A LLaVA / FIT-RS style training record; the first human turn starts with ``<image>\\n``."""
    if not qa:
        raise ValueError(f"record {record_id} needs at least one question")
    conversations = []
    for i, item in enumerate(qa):
        prefix = f"{IMAGE_PLACEHOLDER}\n" if i == 0 else ""
        conversations.append({"from": "human", "value": prefix + item["question"]})
        conversations.append({"from": "gpt", "value": item["answer"]})
    return {"id": record_id, "image": image, "layout": layout, "conversations": conversations, **extra}


def fitrsfg_item(question_id: str, image: str, qa: dict[str, str], layout: str = "grid") -> dict[str, Any]:
    """A FIT-RSFG-Bench style evaluation item."""
    return {
        "question_id": question_id,
        "image": image,
        "question": qa["question"],
        "category": qa["kind"],
        "ground_truth": qa["answer"],
        "layout": layout,
    }
