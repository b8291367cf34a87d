"""Where does a CT finding's evidence get lost between the images and the answer?

``python -m finetune.layer_probe --model M --train build/synthetic --data build/heldout20`` asks every
study one presence question and keeps, for every layer of the language model, two hidden states: the mean
over the study's image tokens and the answer position (the last prompt token). Per layer, per finding and
per part it fits a logistic regression on the first ``--n-train`` training studies
(``ct_train_studies.jsonl``) and reports its ROC AUC on the first ``--limit`` held-out studies
(``ct_test_studies.jsonl``). Evidence present in the image tokens but not at the answer position is lost on
the way (the demo model's training history, item 9: Mamba layers without memory); evidence at the answer position that
the model's own Yes/No does not use (``python -m finetune.readout_probe``) is lost in the readout (item 10).
With ``--report-finding NAME`` every study is asked for its report instead, and the report is written
for the model (teacher-forced) from the study's own reference findings up to the sentence that names
NAME's finding (present or absent: "An area of consolidation ..." / "No consolidation was observed."): the
"answer position" is then the last token before that sentence, where the model decides which of the two
it writes, and ``model_readout_auc`` is how well its own next token separates them (minus the
log-probability of the absent sentence's first token), to set beside the probe's AUC at that position;
``model_writes_absent`` is how often its greedy next token there is that first token, in the studies with the
finding and in those without (a readout AUC near 1 with the absent sentence written for most studies with
the finding: the ranking is right and the threshold is not).
Writes ``layer_probe.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.vision_probe import STUDIES_FILE, auc_or_none, write_probe_result

RESULT_FILE = "layer_probe.json"
PARTS = ("image mean", "answer position")
DEFAULT_QUESTION = "Does this chest CT show emphysema? Answer Yes or No."
PROBE_C = 0.05  # strong L2 regularisation: a few hundred studies, hidden sizes of hundreds
REPORT_PREFIX = "Findings: "  # how the synthetic reports' answers begin (finetune.data)
# the word that marks each finding's sentence in a synthetic report, present or absent (emphysema has none:
# its absence is not written, so the report has no place where the model decides it)
REPORT_SENTENCE_WORDS = {"Cardiomegaly": "heart", "Pleural effusion": "pleural effusion",
                         "Consolidation": "consolidation", "Lung nodule": "nodule"}


def study_truth(studies_file: Path, limit: int) -> tuple[list[dict[str, Any]], list[str], np.ndarray]:
    """The first ``limit`` studies of a ``ct_*_studies.jsonl``, the finding names, and (studies x findings)
    presence."""
    from finetune import FinetuneError

    if not studies_file.is_file():
        raise FinetuneError(f"{studies_file}: missing; pass a synthetic build folder (python -m finetune.demo_data)")
    studies = [json.loads(line) for line in studies_file.open() if line.strip()][:limit]
    if not studies:
        raise FinetuneError(f"{studies_file}: no studies")
    findings = sorted(studies[0]["ground_truth"]["findings"])
    truth = np.array([[s["ground_truth"]["findings"][f]["present"] for f in findings] for s in studies], dtype=bool)
    return studies, findings, truth


def report_prefix(study: dict[str, Any], finding: str) -> str:
    """The study's reference findings up to (not including) the sentence that names ``finding``, as the
    model writes them after ``REPORT_PREFIX``; ends at the previous sentence's full stop."""
    from finetune import FinetuneError

    word = REPORT_SENTENCE_WORDS.get(finding)
    if word is None:
        raise FinetuneError(f"--report-finding {finding!r}: the synthetic reports give no sentence for its absence; "
                            f"choose one of {sorted(REPORT_SENTENCE_WORDS)}")
    text = (study.get("report") or {}).get("findings")
    if not text:
        raise FinetuneError(f"study {study.get('id')}: no report findings in its studies record; rebuild the "
                            "synthetic set (python -m finetune.demo_data)")
    sentences = re.split(r"(?<=\.) ", text)
    at = next((i for i, sentence in enumerate(sentences) if word in sentence.lower()), None)
    if at is None:
        raise FinetuneError(f"study {study.get('id')}: its report has no sentence with {word!r}: {text!r}")
    return (REPORT_PREFIX + " ".join(sentences[:at])).rstrip()


def absent_sentence(studies: Sequence[dict[str, Any]], findings: Sequence[str], truth: np.ndarray,
                    finding: str) -> str:
    """The sentence a report writes when ``finding`` is absent (the first such study's)."""
    from finetune import FinetuneError

    column = list(findings).index(finding)
    for study, present in zip(studies, truth[:, column], strict=True):
        if not present:
            prefix = report_prefix(study, finding)[len(REPORT_PREFIX):]
            return study["report"]["findings"][len(prefix):].strip().split(". ")[0]
    raise FinetuneError(f"no training study without {finding}: the absent sentence is unknown")


def question_records(studies: Sequence[dict[str, Any]], question: str, root: Path) -> list[dict[str, Any]]:
    """One evaluation record per study asking ``question`` (the answer is not used); study paths made
    absolute against the build folder ``root``, so the records can live anywhere."""
    return [{"id": s["id"], "image": str((root / s["image"]).resolve()), "layout": "series", "kind": "probe",
             "study": s["id"],
             "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "No"}]}
            for s in studies]


def layer_states(model: Any, processor: Any, records_file: Path, render: dict, cache: Path,
                 prefixes: Sequence[str] | None = None,
                 next_text: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(studies x layers + 1 x parts x hidden): per hidden state, the image-token mean and the answer position;
    and per study the log-probability of ``next_text``'s first token there and whether it is the greedy next
    token (both NaN without ``next_text``). ``prefixes``: per study, text written for the model after the
    generation prompt (teacher-forced)."""
    import torch
    from tqdm import tqdm

    from finetune.evaluate import item_prompt, load_ct_rate_items

    image_token = model.config.image_token_id
    items = load_ct_rate_items(str(records_file), None, render)
    prefixes = prefixes if prefixes is not None else [""] * len(items)
    states, next_logprobs, next_is_greedy = [], [], []
    for item, prefix in tqdm(list(zip(items, prefixes, strict=True)), desc=records_file.stem, unit="study"):
        prompt, images = item_prompt(item, cache)
        inputs = processor(text=[prompt + prefix], images=images, return_tensors="pt")
        with torch.inference_mode():
            output = model(**inputs, output_hidden_states=True)
        is_image = inputs["input_ids"][0] == image_token
        states.append(torch.stack([torch.stack([h[0][is_image].mean(0), h[0, -1]])
                                   for h in output.hidden_states]).float().numpy())
        if next_text is None:
            next_logprobs.append(float("nan"))
            next_is_greedy.append(float("nan"))
            continue
        token = first_new_token(processor.tokenizer, prompt + prefix, next_text)
        logits = output.logits[0, -1].float()
        next_logprobs.append(float(logits.log_softmax(-1)[token]))
        next_is_greedy.append(float(int(logits.argmax()) == token))
    return np.stack(states), np.array(next_logprobs), np.array(next_is_greedy)


def first_new_token(tokenizer: Any, text: str, continuation: str) -> int:
    """The id of the first token that ``" " + continuation`` adds after ``text``."""
    from finetune import FinetuneError

    before = tokenizer(text, add_special_tokens=False)["input_ids"]
    after = tokenizer(f"{text} {continuation}", add_special_tokens=False)["input_ids"]
    if after[:len(before)] != before or len(after) == len(before):
        raise FinetuneError(f"the continuation {continuation!r} changes how the text before it is tokenised")
    return int(after[len(before)])


def writes_absent_rates(truth: np.ndarray, writes_absent: np.ndarray) -> dict[str, float | None]:
    """How often the greedy next token starts the absent sentence, in the studies with the finding
    (``truth`` 1: each such one a missed finding) and in those without (``None`` where there are none)."""
    rates: dict[str, float | None] = {}
    for name, mask in (("with the finding", truth == 1), ("without it", truth == 0)):
        rates[name] = float(writes_absent[mask].mean()) if mask.any() else None
    return rates


def probe_aucs(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> list[float | None]:
    """Per column of ``train_y`` (findings): the held-out AUC of a logistic regression on standardised
    features (``train_x``: studies x features); ``None`` where a split has one class only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    aucs: list[float | None] = []
    scaler = StandardScaler().fit(train_x)
    train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
    for column in range(train_y.shape[1]):
        if len(set(train_y[:, column].tolist())) < 2:
            aucs.append(None)
            continue
        classifier = LogisticRegression(C=PROBE_C, max_iter=2000).fit(train_z, train_y[:, column])
        aucs.append(auc_or_none(test_y[:, column].tolist(), classifier.decision_function(test_z).tolist()))
    return aucs


def layer_probe(model_path: str, train_data: str | Path, data: str | Path, n_train: int = 200, limit: int = 20,
                question: str = DEFAULT_QUESTION, work_dir: str | Path | None = None,
                cache_dir: str | Path | None = None, report_finding: str | None = None) -> dict[str, Any]:
    """Per layer and part, the held-out AUC of each finding (see the module docstring). ``work_dir`` gets
    the question files; ``cache_dir`` (default: inside ``work_dir``) the rendered studies; with
    ``report_finding`` the report question, teacher-forced up to that finding's sentence."""
    from finetune import FinetuneError
    from finetune.evaluate import REPORT_QUESTION, model_render_defaults
    from finetune.merge import load_trained
    from finetune.train import install_fast_scan_if_available

    work = Path(work_dir) if work_dir is not None else Path(data) / "layer_probe_work"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else work / "image_cache"
    train_studies, findings, train_y = study_truth(Path(train_data) / "ct_train_studies.jsonl", n_train)
    test_studies, test_findings, test_y = study_truth(Path(data) / STUDIES_FILE, limit)
    if test_findings != findings:  # the probes pair truth columns by position
        raise FinetuneError(f"{data} names the findings {test_findings}, {train_data} {findings}; "
                            "pass two builds of the same generator")
    absent = None
    if report_finding is not None:
        if report_finding not in findings:
            raise FinetuneError(f"--report-finding {report_finding!r} is none of the studies' findings {findings}")
        question, absent = REPORT_QUESTION, absent_sentence(train_studies, findings, train_y, report_finding)
    install_fast_scan_if_available()
    model, processor = load_trained(model_path)
    render = model_render_defaults(model_path)
    features, next_logprobs, next_is_greedy = {}, {}, {}
    for split, studies, root in (("train", train_studies, train_data), ("test", test_studies, data)):
        records = work / f"{split}_questions.jsonl"
        rows = question_records(studies, question, Path(root))
        records.write_text("".join(json.dumps(r) + "\n" for r in rows))
        prefixes = None if report_finding is None else [report_prefix(s, report_finding) for s in studies]
        scored = absent if split == "test" else None  # the readout is scored on the held-out studies only
        features[split], next_logprobs[split], next_is_greedy[split] = layer_states(
            model, processor, records, render, cache, prefixes, scored)
    layers = []
    for layer in range(features["train"].shape[1]):
        layers.append({part: dict(zip(findings, probe_aucs(features["train"][:, layer, p], train_y,
                                                           features["test"][:, layer, p], test_y)))
                       for p, part in enumerate(PARTS)})
    result = {"model": str(model_path), "train_data": str(train_data), "data": str(data), "question": question,
              "n_train": len(train_studies), "n_test": len(test_studies), "findings": findings,
              "test_present": dict(zip(findings, test_y.sum(axis=0).tolist())), "layers": layers}
    if report_finding is not None:
        truth = test_y[:, findings.index(report_finding)]
        result.update(report_finding=report_finding, absent_sentence=absent,
                      model_readout_auc=auc_or_none(truth.tolist(), (-next_logprobs["test"]).tolist()),
                      model_writes_absent=writes_absent_rates(truth, next_is_greedy["test"]))
    return result


def format_table(result: dict[str, Any]) -> str:
    findings = result["findings"]
    width = max(len(f) for f in findings)
    lines = ["layer | part            | " + " | ".join(f"{f:>{width}}" for f in findings)]
    for index, layer in enumerate(result["layers"]):
        for part in PARTS:
            cells = [f"{'n/a':>{width}}" if layer[part][f] is None else f"{layer[part][f]:>{width}.2f}"
                     for f in findings]
            lines.append(f"{index:>5} | {part:<15} | " + " | ".join(cells))
    lines.append("(layer 0 = embeddings; held-out ROC AUC of a logistic probe trained on "
                 f"{result['n_train']} studies, scored on {result['n_test']})")
    if "report_finding" in result:
        readout = result["model_readout_auc"]
        lines.append(f"answer position: the last report token before the {result['report_finding']} sentence; the "
                     f"model's own readout there (not '{result['absent_sentence']}'): AUC "
                     + ("n/a" if readout is None else f"{readout:.3f}"))
        rates = ", ".join(f"{name} {'n/a' if rate is None else f'{rate:.2f}'}"
                          for name, rate in result["model_writes_absent"].items())
        lines.append(f"its greedy next token starts '{result['absent_sentence']}' in the studies {rates}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.layer_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or 'demo')")
    parser.add_argument("--train", default="build/synthetic", help="build with ct_train_studies.jsonl")
    parser.add_argument("--data", required=True, help="build with ct_test_studies.jsonl (held-out)")
    parser.add_argument("--n-train", type=int, default=200, help="training studies to fit on (default 200)")
    parser.add_argument("--limit", type=int, default=20, help="held-out studies to score (default 20)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="the presence question every study is asked")
    parser.add_argument("--report-finding", choices=sorted(REPORT_SENTENCE_WORDS),
                        help="ask for the report instead, teacher-forced up to this finding's sentence")
    parser.add_argument("--cache-dir", help="image cache for the rendered studies (e.g. the training run's "
                        "build/demo_image_cache; default: a folder beside layer_probe.json)")
    parser.add_argument("--out", help="folder for layer_probe.json (default: the model folder's parent)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model).resolve().parent
    result = layer_probe(args.model, args.train, args.data, args.n_train, args.limit, args.question,
                         work_dir=out / "layer_probe_work", cache_dir=args.cache_dir,
                         report_finding=args.report_finding)
    write_probe_result(out, RESULT_FILE, result, format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
