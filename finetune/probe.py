"""Does a model look at its images? Answer loss with each record's own images vs another record's.

``longllava probe-images --model M --data FILE`` takes training-format records (any layout: CT
studies, satellite grids, image lists), and for each one computes the loss of its answer tokens twice:
with its own images, and with the images of another record that has other images of the same count
(:func:`swap_partners`; records without such a partner are skipped and counted). A model that reads
the pictures answers worse with the wrong ones: the mean gap
``swapped - own`` is clearly positive and most records prefer their own images. A model that answers
from the question alone shows a gap near zero and about half (or all ties).

This is the check that found the bundled demo model blind to its images (see its model card), a
failure the training loss alone does not show.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# |gap| below this (nats per answer token) counts as a tie: the two losses agree to float precision.
TIE_TOLERANCE = 1e-4


@dataclass
class ImageRelianceResult:
    model: str
    data: str
    n_records: int
    n_skipped: int  # records with images but no record with other images of the same count
    mean_own_loss: float
    mean_swapped_loss: float
    mean_gap: float  # swapped - own, nats per answer token
    gap_ci95: tuple[float, float]  # bootstrap interval of the mean gap
    prefer_own: float  # fraction of records whose own images give the lower loss
    ties: float  # fraction with |gap| < TIE_TOLERANCE
    verdict: str
    per_record: list[dict[str, Any]] = field(default_factory=list)

    def summary_line(self) -> str:
        low, high = self.gap_ci95
        return (f"{self.n_records} records: answer loss own images {self.mean_own_loss:.4f}, swapped "
                f"{self.mean_swapped_loss:.4f}, gap {self.mean_gap:+.4f} (95% CI {low:+.4f}..{high:+.4f}); "
                f"own images better for {self.prefer_own:.0%}, ties {self.ties:.0%}; {self.verdict}")


def swap_partners(image_sets: Sequence[Sequence[Any]], seed: int = 0) -> dict[int, int]:
    """index -> index of a record with other images of the same count.

    ``image_sets`` are each record's image files. Within each count, the distinct sets are put in a
    seeded cyclic order and every record takes the images of the next set, so no record keeps its own
    (records of one study, several questions each, share a set and never swap among themselves).
    Counts with a single distinct set, and records without images, get no partner."""
    groups: dict[int, dict[tuple, list[int]]] = defaultdict(dict)
    for index, images in enumerate(image_sets):
        key = tuple(str(p) for p in images)
        if key:
            groups[len(key)].setdefault(key, []).append(index)
    rng = np.random.default_rng([seed, 17])
    partners = {}
    for by_set in groups.values():
        sets = list(by_set)
        if len(sets) < 2:
            continue
        order = [sets[i] for i in rng.permutation(len(sets))]
        for position, key in enumerate(order):
            donor = by_set[order[(position + 1) % len(order)]][0]
            partners.update({index: donor for index in by_set[key]})
    return partners


def verdict_of(ci95: tuple[float, float], prefer_own: float) -> str:
    """From the bootstrap interval of the mean gap and the share of records preferring their own images."""
    if ci95[0] > 0 and prefer_own > 0.5:
        return "the answers depend on the images"
    if ci95[1] < 0:
        return "the answers are better with the wrong images (mismatched data?)"
    return "no evidence that the answers depend on the images"


def _answer_loss(model: Any, item: dict, pixel_values: Any) -> float:
    import torch

    with torch.inference_mode():
        out = model(input_ids=item["input_ids"][None], labels=item["labels"][None],
                    position_ids=item["position_ids"][None], pixel_values=pixel_values)
    return float(out.loss)


def _bootstrap_ci(values: np.ndarray, seed: int, rounds: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng([seed, 23])
    means = values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def image_reliance(model_path: str, data: str, limit: int | None = 40, seed: int = 0,
                   cache_dir: str | Path | None = None, show_progress: bool = True) -> ImageRelianceResult:
    """Own vs swapped images over the first ``limit`` records of ``data`` that have a swap partner.

    CT studies and rasters are rendered into ``cache_dir`` (default: a temporary folder, removed after)."""
    import tempfile

    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="longllava_probe_") as folder:
            return image_reliance(model_path, data, limit, seed, folder, show_progress)
    from finetune import FinetuneError
    from finetune import data as data_lib
    from finetune.evaluate import model_render_defaults
    from finetune.train import tokens_per_image_of
    from longllava.loading import load_model

    model, processor = load_model(model_path)
    model.eval()
    records = data_lib.load_records(data, None, model_render_defaults(model_path))
    encoder = data_lib.ConversationEncoder(processor.tokenizer, tokens_per_image_of(processor, model), max_length=None)
    samples = [encoder.encode(r, data_lib.record_visuals(r, Path(cache_dir))) for r in records]
    partners = swap_partners([s.image_paths for s in samples], seed)
    chosen = [i for i in range(len(samples)) if i in partners][: limit or None]
    if len(chosen) < 2:
        raise FinetuneError(f"{data}: no two records have different images of the same count, so no images "
                            "can be swapped; give more records (e.g. several studies rendered with the same slice count)")
    dataset = data_lib.ConversationDataset(samples, data_lib.processor_image_loader(processor.image_processor))
    iterator = chosen
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chosen, desc="probing images", unit="record")
    rows = []
    for index in iterator:
        item, other = dataset[index], dataset[partners[index]]
        own, swapped = _answer_loss(model, item, item["pixel_values"]), _answer_loss(model, item, other["pixel_values"])
        rows.append({"id": records[index].id, "swapped_with": records[partners[index]].id,
                     "own_loss": own, "swapped_loss": swapped, "gap": swapped - own})
    gaps = np.array([r["gap"] for r in rows])
    ci95 = _bootstrap_ci(gaps, seed)
    prefer_own = float(np.mean(gaps >= TIE_TOLERANCE))
    return ImageRelianceResult(
        model=str(model_path), data=str(data), n_records=len(rows),
        n_skipped=sum(1 for i in range(len(samples)) if i not in partners and samples[i].image_paths),
        mean_own_loss=float(np.mean([r["own_loss"] for r in rows])),
        mean_swapped_loss=float(np.mean([r["swapped_loss"] for r in rows])),
        mean_gap=float(gaps.mean()), gap_ci95=ci95, prefer_own=prefer_own,
        ties=float(np.mean(np.abs(gaps) < TIE_TOLERANCE)), verdict=verdict_of(ci95, prefer_own),
        per_record=rows)


def write_result(result: ImageRelianceResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "image_reliance.json"
    path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return path
