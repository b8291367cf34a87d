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
    args = parser.parse_args(argv)
    manifest = build_demo_data(args.out, args.seed, args.scale)
    print(json.dumps(manifest["counts"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
