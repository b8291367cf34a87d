"""The bundled demo model's data: seeded synthetic CT, satellite and needle-in-a-haystack sets.

``python -m finetune.demo_data --out build/synthetic`` writes everything the ``demo`` recipe trains on
and the held-out sets its model card is scored on:

* the synthetic build (:func:`domain_data.synthetic.build.build_synthetic_sets`) with the demo's
  :data:`DEMO_BUILD` options: findings sized so a 160 px vision tower trained from scratch can see
  them (nodules of 7-11 mm radius, more emphysema patches), satellite objects drawn 1.5x larger;
  ``ct_train.json`` / ``rs_train.json`` for training, ``ct_test.jsonl`` / ``rs_test_fitrsfg.jsonl``
  held out (other seeds: the build gives train and test their own seed streams);
* ``niah_train.json``: needle-in-a-haystack training records (4-16 images, the needle at a uniform
  depth) drawn from a haystack pool and needle seeds far away from any evaluation seed
  (:data:`NIAH_TRAIN_SEED_BASE`; ``longllava evaluate niah --data synthetic:...`` derives its seeds
  from small integers).
* ``*_train_perq.json``: the same training records split one question per record
  (:func:`write_per_question_records`), in a seeded shuffled order. Evaluation asks every question alone,
  straight after the images; a study's questions in one conversation in a fixed order would teach the
  model that the first answer after the images is always the same question's.

Same arguments -> the same files (every draw is seeded).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEMO_BUILD: dict[str, Any] = {
    "seed": 0,
    "n_ct_train": 240,
    "n_ct_test": 40,
    "n_rs_train": 300,
    "n_rs_test": 40,
    "ct_finding_params": {
        "Lung nodule": {"radius_range_mm": (7.0, 11.0), "count_range": (1, 3)},
        "Emphysema": {"patches": 24},
    },
    "rs_object_scale": 1.5,
}
NIAH_TRAIN_SEED_BASE = 1_000_000_000
NIAH_TRAIN_RECORDS = 400
NIAH_POOL_SIZE = 800
NIAH_IMAGES_RANGE = (4, 16)
NIAH_SIZE = 112
IMAGE_TAG = "<image>"
PER_QUESTION_SOURCES = ("ct_train.json", "rs_train.json", "niah_train.json")


class DemoDataError(ValueError):
    """A training-record file that cannot be split per question."""


def split_per_question(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (question, answer) turn pair.

    Where the source's first question carries the image tag (``<image>``: series / grid layouts), every
    split question gets it in front; where it has none (``images`` layout: the protocol places one tag
    per image), none do. ids become ``ID_qNN`` (NN: the turn pair's position in the source conversation)."""
    turns = record.get("conversations") or []
    if len(turns) % 2 or any(t.get("from") != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)):
        raise DemoDataError(f"record {record.get('id')!r}: conversations must alternate human/gpt turns, "
                            "starting with human; fix or rebuild the data (python -m finetune.demo_data)")
    tag = f"{IMAGE_TAG}\n" if turns and IMAGE_TAG in turns[0]["value"] else ""
    pieces = []
    for pair in range(len(turns) // 2):
        question = turns[2 * pair]["value"].replace(IMAGE_TAG, "").strip()
        piece = {key: value for key, value in record.items() if key != "conversations"}
        piece["id"] = f"{record.get('id', 'record')}_q{pair:02d}"
        piece["conversations"] = [{"from": "human", "value": f"{tag}{question}"},
                                  dict(turns[2 * pair + 1])]
        pieces.append(piece)
    return pieces


def per_question_records(records: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Every record split per question (:func:`split_per_question`), in a seeded shuffled order."""
    pieces = [piece for record in records for piece in split_per_question(record)]
    order = np.random.default_rng([seed, 7]).permutation(len(pieces))
    return [pieces[i] for i in order]


def write_per_question_records(out_dir: str | Path, seed: int = 0,
                               sources: Sequence[str] = PER_QUESTION_SOURCES) -> list[Path]:
    """Rewrite each built training file ``NAME.json`` in ``out_dir`` as ``NAME_perq.json`` (per question)."""
    written = []
    for name in sources:
        source = Path(out_dir) / name
        if not source.is_file():
            raise DemoDataError(f"{source}: training records not found; build them first "
                                f"(python -m finetune.demo_data --out {out_dir})")
        target = source.with_name(f"{source.stem}_perq.json")
        records = json.loads(source.read_text())
        target.write_text(json.dumps(per_question_records(records, seed), indent=1) + "\n")
        written.append(target)
    return written


def build_niah_train(out_dir: str | Path, n_records: int = NIAH_TRAIN_RECORDS, pool_size: int = NIAH_POOL_SIZE,
                     images_range: tuple[int, int] = NIAH_IMAGES_RANGE, size: int = NIAH_SIZE,
                     seed: int = 0) -> Path:
    """Write ``niah_train/`` images and ``niah_train.json`` (LLaVA records, layout ``images``)."""
    from PIL import Image

    from domain_data.synthetic.niah import (
        NEEDLE_COLOURS,
        NEEDLE_SHAPES,
        NIAH_QUESTION,
        haystack_image,
        needle_image,
    )

    out = Path(out_dir)
    folder = out / "niah_train"
    folder.mkdir(parents=True, exist_ok=True)
    pool_seed = NIAH_TRAIN_SEED_BASE + seed
    pool = []
    for index in range(pool_size):
        rel = f"niah_train/hay_{index:05d}.png"
        Image.fromarray(haystack_image(pool_seed, index, size)).save(out / rel)
        pool.append(rel)
    rng = np.random.default_rng([pool_seed, 1])
    records = []
    for k in range(n_records):
        n_images = int(rng.integers(images_range[0], images_range[1] + 1))
        chosen = [pool[i] for i in rng.choice(pool_size, size=n_images, replace=False)]
        colour, shape = str(rng.choice(list(NEEDLE_COLOURS))), str(rng.choice(NEEDLE_SHAPES))
        needle_at = int(rng.integers(0, n_images))
        rel = f"niah_train/needle_{k:05d}.png"
        # the needle is drawn on a haystack image of the same pool seed but an index outside the pool
        Image.fromarray(needle_image(pool_seed, colour, shape, size, pool_size + k)).save(out / rel)
        chosen[needle_at] = rel
        records.append({
            "id": f"niah_train_{k:05d}",
            "images": chosen,
            "layout": "images",
            "conversations": [{"from": "human", "value": NIAH_QUESTION}, {"from": "gpt", "value": f"{colour} {shape}"}],
        })
    target = out / "niah_train.json"
    target.write_text(json.dumps(records, indent=1) + "\n")
    return target


def build_demo_data(out_dir: str | Path, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """The synthetic build with :data:`DEMO_BUILD` (set sizes times ``scale``) plus ``niah_train.json``."""
    from domain_data.synthetic.build import build_synthetic_sets

    options = dict(DEMO_BUILD, seed=seed)
    for key in ("n_ct_train", "n_ct_test", "n_rs_train", "n_rs_test"):
        options[key] = max(1, round(options[key] * scale))
    manifest = build_synthetic_sets(out_dir, **options)
    build_niah_train(out_dir, n_records=max(1, round(NIAH_TRAIN_RECORDS * scale)),
                     pool_size=max(40, round(NIAH_POOL_SIZE * scale)), seed=seed)
    write_per_question_records(out_dir, seed)
    return manifest


def build_heldout_subset(out_dir: str | Path, n_ct: int = 1, n_rs: int = 1, seed: int = 0) -> dict[str, Any]:
    """Only the first ``n_ct`` CT studies and ``n_rs`` scenes of the held-out sets (no training data).

    Every study / scene is seeded by (seed, domain, split, index) alone, so these are exactly the first
    items of the full build's ``ct_test.jsonl`` / ``rs_test_fitrsfg.jsonl``: what CI scores the bundled
    model on, to compare with the predictions recorded in its model card."""
    from domain_data.synthetic.build import build_synthetic_sets

    options = dict(DEMO_BUILD, seed=seed, n_ct_train=0, n_rs_train=0, n_ct_test=n_ct, n_rs_test=n_rs)
    return build_synthetic_sets(out_dir, **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/synthetic", help="output folder (default build/synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every set size (e.g. 0.02 for a smoke run)")
    parser.add_argument("--per-question-only", action="store_true",
                        help="only rewrite an existing build's training files as *_perq.json (no rebuild)")
    args = parser.parse_args(argv)
    if args.per_question_only:
        for path in write_per_question_records(args.out, args.seed):
            print(f"wrote {path} ({len(json.loads(path.read_text()))} records)")
        return 0
    manifest = build_demo_data(args.out, args.seed, args.scale)
    print(json.dumps(manifest["counts"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
