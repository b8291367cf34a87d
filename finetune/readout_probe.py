"""Does a model's Yes/No answer depend on the question, or only on the study?

``python -m finetune.readout_probe --model M --data build/heldout20`` asks every CT presence question of
the first ``--limit`` studies of a synthetic build (``ct_test.jsonl``, as ``longllava evaluate ct-rate``
asks them) and records the margin ``logit(Yes) - logit(No)`` of the first answer token. Per finding it
reports the study-level ROC AUC of that margin and how often the greedy answer is "Yes"; and the
**within-study AUC**: inside each study, how often a present finding's margin (less that finding's mean
over the studies) beats an absent one's. A question-blind readout -- one abnormality score per study
plus a bias per finding, the failure of items 6 and 8 of the demo model's training history -- ties every such pair
(0.5); a readout that reads the asked finding off the images ranks present findings above absent ones
within the same study (1.0), whatever each study's overall offset.

It also reports, per layer, how much the answer position's hidden state varies across studies (relative
to its norm, averaged over the findings asked): a layer whose figure is near zero passes nothing of the
images to the answer (``answer_state_spread``; index 0 is the token embeddings, always ~0); a model built
without Mamba's time-step init showed ~1e-7 up to its attention layer. Writes ``readout_probe.json``
into ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.vision_probe import auc_or_none, write_probe_result

PRESENCE_KIND = "presence"
RESULT_FILE = "readout_probe.json"


def finding_centred(margins: np.ndarray) -> np.ndarray:
    """``margins`` (studies x findings) minus each finding's mean over the studies: what is left of a
    per-finding bias. Rounded, so that an additive table leaves ties, not float dust."""
    return (margins - margins.mean(axis=0, keepdims=True)).round(6)


def within_study_auc(margins: np.ndarray, truth: np.ndarray) -> float | None:
    """How often, inside one study, a present finding's finding-centred margin beats an absent one's
    (ties count half), over every such pair of every study; ``None`` without such pairs. A readout made of
    one score per study plus one bias per finding ties every pair (0.5); one that reads the asked finding
    ranks them all (1.0) whatever each study's offset."""
    centred = finding_centred(margins)
    wins, pairs = 0.0, 0
    for row, present in zip(centred, truth):
        difference = row[present][:, None] - row[~present][None, :]
        wins += float((difference > 0).sum() + 0.5 * (difference == 0).sum())
        pairs += difference.size
    return wins / pairs if pairs else None


def readout_scores(margins: np.ndarray, truth: np.ndarray, findings: Sequence[str]) -> dict[str, Any]:
    """Figures of a (studies x findings) margin table against the (studies x findings) truth."""
    per_finding = {
        finding: {"present": int(truth[:, j].sum()), "answered_yes": int((margins[:, j] > 0).sum()),
                  "study_auc": auc_or_none(truth[:, j].tolist(), margins[:, j].tolist())}
        for j, finding in enumerate(findings)}
    yes_patterns = {tuple(bool(x) for x in row) for row in margins > 0}
    return {
        "findings": per_finding,
        "within_study_auc": within_study_auc(margins, truth),
        "pooled_auc": auc_or_none(truth.ravel().tolist(), margins.ravel().tolist()),
        "distinct_yes_patterns": len(yes_patterns),
        "studies_all_same_answer": int(sum(len(set(row)) == 1 for row in (margins > 0).tolist())),
    }


def relative_spread(states: np.ndarray) -> np.ndarray:
    """``states`` (studies x layers x hidden) -> per layer, the RMS distance of a study's state from the
    mean state, over the mean state's norm."""
    mean = states.mean(axis=0)
    spread = np.sqrt(((states - mean) ** 2).sum(axis=-1).mean(axis=0))
    return spread / np.maximum(np.linalg.norm(mean, axis=-1), 1e-12)


def _answer_token(tokenizer: Any, prompt: str, answer: str) -> int:
    """The first token of ``answer`` as it follows ``prompt`` (byte-level BPE may merge across the edge)."""
    from finetune import FinetuneError

    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joined = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if joined[:len(alone)] != alone or len(joined) == len(alone):
        raise FinetuneError(f"answer {answer!r} does not start a new token after the prompt; "
                            "this probe needs a chat template that ends the prompt at a token boundary")
    return int(joined[len(alone)])


def presence_margins(model_path: str, data: str | Path, limit: int | None = 20,
                     cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The margin table of ``model_path`` on the presence questions of the first ``limit`` studies."""
    import torch
    from tqdm import tqdm

    from finetune import FinetuneError
    from finetune.evaluate import item_prompt, load_ct_rate_items, model_render_defaults
    from finetune.merge import load_trained
    from finetune.train import install_fast_scan_if_available

    render = model_render_defaults(model_path)
    items = [item for item in load_ct_rate_items(str(data), None, render)
             if item.reference.get("kind") == PRESENCE_KIND]
    studies = list(dict.fromkeys(item.reference["study"] for item in items))[:limit]
    findings = sorted({item.reference["finding"] for item in items})
    items = [item for item in items if item.reference["study"] in studies]
    if not items:
        raise FinetuneError(f"{data}: no CT presence questions (kind 'presence' in ct_test.jsonl); "
                            "pass a synthetic build folder (python -m finetune.demo_data)")
    install_fast_scan_if_available()
    model, processor = load_trained(model_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    cache = Path(cache_dir) if cache_dir is not None else Path(data) / "readout_probe_cache"
    margins = np.full((len(studies), len(findings)), np.nan)
    truth = np.zeros_like(margins, dtype=bool)
    answer_states: dict[int, list[np.ndarray]] = {column: [] for column in range(len(findings))}
    for item in tqdm(items, desc="presence margins", unit="question"):
        prompt, images = item_prompt(item, cache)
        yes, no = _answer_token(tokenizer, prompt, "Yes"), _answer_token(tokenizer, prompt, "No")
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        with torch.inference_mode():
            output = model(**inputs, output_hidden_states=True)
        logits = output.logits[0, -1]
        row, column = studies.index(item.reference["study"]), findings.index(item.reference["finding"])
        answer_states[column].append(torch.stack([h[0, -1] for h in output.hidden_states]).float().numpy())
        margins[row, column] = float(logits[yes] - logits[no])
        truth[row, column] = item.reference["answer"].strip().lower().startswith("yes")
    if np.isnan(margins).any():
        raise FinetuneError(f"{data}: not every study has a presence question for every finding "
                            f"({', '.join(findings)}); the within-study figure needs the full table")
    spread = np.mean([relative_spread(np.stack(states)) for states in answer_states.values()], axis=0)
    return {"model": str(model_path), "data": str(data), "studies": studies, "findings_order": findings,
            "margins": margins.round(4).tolist(), "truth": truth.tolist(),
            "answer_state_spread": [float(f"{value:.3g}") for value in spread],
            **readout_scores(margins, truth, findings)}


def format_table(result: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    lines = [f"{'finding':<18} {'present':>7} {'yes':>5} {'study AUC':>9}"]
    for finding, row in result["findings"].items():
        lines.append(f"{finding:<18} {row['present']:>7} {row['answered_yes']:>5} {cell(row['study_auc']):>9}")
    lines.append(f"within-study AUC {cell(result['within_study_auc'])} (0.5: the answer ignores which finding "
                 f"is asked); pooled AUC {cell(result['pooled_auc'])}; {result['distinct_yes_patterns']} "
                 f"distinct Yes patterns, {result['studies_all_same_answer']} of {len(result['studies'])} "
                 "studies answered alike for every finding")
    spread = " ".join(f"{value:.1e}" for value in result.get("answer_state_spread", []))
    lines.append(f"answer-position state, spread across studies / norm, per layer (0 = embeddings): {spread}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.readout_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or 'demo')")
    parser.add_argument("--data", required=True, help="synthetic build folder with ct_test.jsonl")
    parser.add_argument("--limit", type=int, default=20, help="first N studies (default 20)")
    parser.add_argument("--out", help="folder for readout_probe.json (default: the model folder's parent)")
    args = parser.parse_args(argv)
    result = presence_margins(args.model, args.data, args.limit)
    write_probe_result(args.out or Path(args.model).resolve().parent, RESULT_FILE, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
