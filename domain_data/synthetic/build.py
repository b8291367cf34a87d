"""Build the seeded synthetic train / held-out sets (CT studies, satellite scenes, NIAH) on disk.

``python -m domain_data.synthetic.build --out DIR --seed N`` (or :func:`build_synthetic_sets`) writes::

    DIR/manifest.json                 parameters, file list, counts, conventions (no outside paths, no time)
    DIR/ct/{train,test}/ct_{split}_NNNN.nii.gz     NIfTI studies (int16 HU, LPS voxel axes)
    DIR/ct/{train,test}/ct_{split}_NNNN/CT*.dcm     every ``dicom_every``-th study as a DICOM series folder
    DIR/ct/{train,test}/ct_{split}_NNNN_labels.npy.gz   each study's (z, y, x) tissue / finding label map
                                      (``ct_phantom.read_label_map``; where each finding is, for training)
    DIR/ct_train.json                 list of LLaVA records, one per study, all questions + report as turns
    DIR/ct_test.jsonl                 one LLaVA record per question (fields kind, finding)
    DIR/ct_{split}_labels.csv         CT-RATE style label table: VolumeName + the 5 rendered findings (0/1)
    DIR/ct_{split}_studies.jsonl      per-study ground truth (findings with sides, slice ranges), report
                                      and ``label_map`` (the path of its label map)
    DIR/rs/{train,test}/rs_{split}_NNNN.tif        GeoTIFF scenes (uint8 RGB, EPSG:32633, 0.5 m)
    DIR/rs_train.json                 LLaVA / FIT-RS records, one per scene, all questions as turns
    DIR/rs_test.jsonl                 one LLaVA record per question (fields kind, object)
    DIR/rs_test_fitrsfg.jsonl         FIT-RSFG-Bench style items
                                      {question_id, image, question, category, ground_truth}
    DIR/rs_{split}_scenes.jsonl       per-scene ground truth (objects, pixel boxes, tiles)
    DIR/niah/haystack/NNNN.png, DIR/niah/needles/needle_KK.png, DIR/niah_test.jsonl (when n_niah > 0)

Every ``image`` path is relative to DIR. Records carry ``layout``: ``series`` (CT: the slices of the
study as an ordered series), ``grid`` (scene: thumbnail + tiles of ``tile_size``), ``images`` (NIAH:
the list in ``images``). In every record the first human turn holds one ``<image>``, which stands
for the whole study / scene / image list. Slice numbers in answers are 1-based in the study's own
slice order (inferior -> superior); a pipeline that resamples the series must map them
(:func:`domain_data.synthetic.qa.map_slice_range`). Same seed and arguments -> byte-identical
JSON/CSV/NIfTI/DICOM and identical GeoTIFF arrays.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domain_data.synthetic.ct_phantom import (
    LABEL_MAP_SUFFIX,
    RENDERABLE_FINDINGS,
    make_ct_phantom,
    write_dicom_series,
    write_label_map,
    write_nifti,
)
from domain_data.synthetic.errors import SyntheticDataError
from domain_data.synthetic.niah import (
    NEEDLE_COLOURS,
    NEEDLE_SHAPES,
    NIAH_QUESTION,
    haystack_image,
    needle_image,
)
from domain_data.synthetic.qa import (
    IMAGE_PLACEHOLDER,
    ct_questions,
    ct_report,
    ct_report_question,
    fitrsfg_item,
    llava_record,
    scene_questions,
)
from domain_data.synthetic.satellite import make_scene, write_geotiff

FORMAT_VERSION = 1
_DOMAIN_CODES = {"ct": 1, "rs": 2, "niah": 3}
_SPLIT_CODES = {"train": 1, "test": 2}


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the output (recorded in the manifest)."""

    seed: int = 0
    n_ct_train: int = 40
    n_ct_test: int = 20
    n_rs_train: int = 40
    n_rs_test: int = 20
    # index of the first test study / scene: items are seeded by index alone, so a build starting at K
    # holds exactly items K.. of a larger build (a fresh held-out set beside one already used)
    first_test_index: int = 0
    ct_size: int = 128
    ct_slices: tuple[int, int] = (100, 160)
    ct_finding_probability: float = 0.5
    ct_finding_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    dicom_every: int = 4
    rs_sizes: tuple[tuple[int, int], ...] = ((672, 1008), (1008, 1008), (1008, 1344))
    tile_size: int = 336
    rs_dtype: str = "uint8"
    rs_object_scale: float = 1.0
    n_niah: int = 0
    niah_images: int = 100
    niah_size: int = 112


def item_seed(seed: int, domain: str, split: str, index: int) -> int:
    """The seed of one study / scene / needle: distinct streams per domain and split."""
    rng = np.random.default_rng([seed, _DOMAIN_CODES[domain], _SPLIT_CODES[split], index])
    return int(rng.integers(0, 2**31 - 1))


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _dump_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")


def _item_indices(split: str, n: int, cfg: BuildConfig) -> range:
    """The item indices a split builds: the test split starts at ``cfg.first_test_index``."""
    first = cfg.first_test_index if split == "test" else 0
    return range(first, first + n)


# ----------------------------------------------------------------------------------------------- CT
def _ct_split(out_dir: Path, split: str, n: int, cfg: BuildConfig) -> dict[str, list]:
    rows: dict[str, list] = {"records": [], "labels": [], "studies": []}
    for i in _item_indices(split, n, cfg):
        study_seed = item_seed(cfg.seed, "ct", split, i)
        slices_rng = np.random.default_rng(study_seed)
        n_slices = int(slices_rng.integers(cfg.ct_slices[0], cfg.ct_slices[1] + 1))
        phantom = make_ct_phantom(
            study_seed,
            n_slices=n_slices,
            size=cfg.ct_size,
            finding_probability=cfg.ct_finding_probability,
            finding_params=cfg.ct_finding_params,
        )
        name = f"ct_{split}_{i:04d}"
        as_dicom = cfg.dicom_every > 0 and i % cfg.dicom_every == cfg.dicom_every - 1
        if as_dicom:
            rel = f"ct/{split}/{name}"
            write_dicom_series(phantom, out_dir / rel, uid_seed=f"{cfg.seed}-{split}-{i}")
        else:
            rel = f"ct/{split}/{name}.nii.gz"
            write_nifti(phantom, out_dir / rel)
        label_map = f"ct/{split}/{name}{LABEL_MAP_SUFFIX}"
        write_label_map(phantom, out_dir / label_map)
        qa = ct_questions(phantom)
        rows["labels"].append([rel, *phantom.label_vector()])
        rows["studies"].append(
            {
                "id": name,
                "image": rel,
                "label_map": label_map,
                "format": "dicom" if as_dicom else "nifti",
                "layout": "series",
                "ground_truth": phantom.ground_truth(),
                "report": ct_report(phantom),
            }
        )
        if split == "train":
            rows["records"].append(llava_record(name, rel, "series", [*qa, ct_report_question(phantom)]))
        else:
            for j, item in enumerate([*qa, ct_report_question(phantom)]):
                extra = {"kind": item["kind"], "finding": item.get("finding"), "study": name}
                rows["records"].append(llava_record(f"{name}_q{j:02d}", rel, "series", [item], **extra))
    return rows


def _labels_csv(rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["VolumeName", *RENDERABLE_FINDINGS])
    writer.writerows(rows)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- RS
def _rs_split(out_dir: Path, split: str, n: int, cfg: BuildConfig) -> dict[str, list]:
    rows: dict[str, list] = {"records": [], "fitrsfg": [], "scenes": []}
    for i in _item_indices(split, n, cfg):
        scene_seed = item_seed(cfg.seed, "rs", split, i)
        size_rng = np.random.default_rng([scene_seed, 1])
        height, width = cfg.rs_sizes[int(size_rng.integers(len(cfg.rs_sizes)))]
        scene = make_scene(
            scene_seed,
            height,
            width,
            dtype=cfg.rs_dtype,
            tile_size=cfg.tile_size,
            object_scale=cfg.rs_object_scale,
        )
        name = f"rs_{split}_{i:04d}"
        rel = f"rs/{split}/{name}.tif"
        write_geotiff(scene, out_dir / rel)
        qa = scene_questions(scene)
        rows["scenes"].append(
            {"id": name, "image": rel, "layout": "grid", "ground_truth": scene.ground_truth()}
        )
        if split == "train":
            rows["records"].append(llava_record(name, rel, "grid", qa, tile_size=cfg.tile_size))
            continue
        for j, item in enumerate(qa):
            qid = f"{name}_q{j:02d}"
            extra = {
                "kind": item["kind"],
                "object": item["object"],
                "scene": name,
                "tile_size": cfg.tile_size,
            }
            rows["records"].append(llava_record(qid, rel, "grid", [item], **extra))
            rows["fitrsfg"].append(fitrsfg_item(qid, rel, item))
    return rows


# --------------------------------------------------------------------------------------------- NIAH
def _niah(out_dir: Path, cfg: BuildConfig) -> list[dict[str, Any]]:
    from PIL import Image

    haystack_seed = item_seed(cfg.seed, "niah", "test", 0)
    (out_dir / "niah/haystack").mkdir(parents=True, exist_ok=True)
    (out_dir / "niah/needles").mkdir(parents=True, exist_ok=True)
    haystack = []
    for i in range(cfg.niah_images):
        rel = f"niah/haystack/{i:04d}.png"
        Image.fromarray(haystack_image(haystack_seed, i, cfg.niah_size)).save(out_dir / rel, optimize=False)
        haystack.append(rel)
    records = []
    for k in range(cfg.n_niah):
        rng = np.random.default_rng(item_seed(cfg.seed, "niah", "test", k + 1))
        colour, shape = str(rng.choice(list(NEEDLE_COLOURS))), str(rng.choice(NEEDLE_SHAPES))
        depth = k / (cfg.n_niah - 1) if cfg.n_niah > 1 else 0.5
        index = int(round(depth * (cfg.niah_images - 1)))
        rel = f"niah/needles/needle_{k:02d}.png"
        image = needle_image(haystack_seed, colour, shape, cfg.niah_size, index)
        Image.fromarray(image).save(out_dir / rel, optimize=False)
        images = [*haystack[:index], rel, *haystack[index + 1 :]]
        records.append(
            {
                "id": f"niah_{k:02d}",
                "images": images,
                "layout": "images",
                "needle_index": index,
                "depth": round(depth, 4),
                "question": NIAH_QUESTION,
                "answer": f"{colour} {shape}",
                "kind": "niah",
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{NIAH_QUESTION}"},
                    {"from": "gpt", "value": f"{colour} {shape}"},
                ],
            }
        )
    return records


# -------------------------------------------------------------------------------------------- build
def _check(cfg: BuildConfig) -> None:
    counts = (cfg.n_ct_train, cfg.n_ct_test, cfg.n_rs_train, cfg.n_rs_test, cfg.n_niah)
    if min(counts) < 0:
        raise SyntheticDataError(f"set sizes must be >= 0, got {counts}")
    if cfg.first_test_index < 0:
        raise SyntheticDataError(f"first_test_index must be >= 0, got {cfg.first_test_index}")
    lo, hi = cfg.ct_slices
    if not 16 <= lo <= hi <= 1000:
        raise SyntheticDataError(f"ct_slices must be a range within 16-1000, got {cfg.ct_slices}")
    if cfg.n_niah and cfg.niah_images < 1:
        raise SyntheticDataError(f"niah_images must be >= 1, got {cfg.niah_images}")


def build_synthetic_sets(
    out_dir: str | Path,
    seed: int = 0,
    n_ct_train: int = 40,
    n_ct_test: int = 20,
    n_rs_train: int = 40,
    n_rs_test: int = 20,
    **options: Any,
) -> dict[str, Any]:
    """Write all sets into ``out_dir`` (see the module doc) and return the manifest.

    ``options`` are the other :class:`BuildConfig` fields (``ct_size``, ``ct_slices``, ``dicom_every``,
    ``ct_finding_probability``, ``ct_finding_params`` (see :func:`make_ct_phantom`), ``rs_sizes``,
    ``tile_size``, ``rs_dtype``, ``rs_object_scale``, ``n_niah``, ``niah_images``, ``niah_size``,
    ``first_test_index``).
    """
    unknown = set(options) - set(BuildConfig.__dataclass_fields__)
    if unknown:
        raise SyntheticDataError(f"unknown build options {sorted(unknown)}: see BuildConfig")
    if "rs_sizes" in options:
        options["rs_sizes"] = tuple(tuple(int(v) for v in s) for s in options["rs_sizes"])
    if "ct_slices" in options:
        options["ct_slices"] = tuple(int(v) for v in options["ct_slices"])
    cfg = BuildConfig(
        seed=seed,
        n_ct_train=n_ct_train,
        n_ct_test=n_ct_test,
        n_rs_train=n_rs_train,
        n_rs_test=n_rs_test,
        **options,
    )
    _check(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    counts: dict[str, int] = {}
    for split, n in (("train", cfg.n_ct_train), ("test", cfg.n_ct_test)):
        rows = _ct_split(out, split, n, cfg)
        main = f"ct_{split}.json" if split == "train" else f"ct_{split}.jsonl"
        (_dump_json if split == "train" else _dump_jsonl)(out / main, rows["records"])
        (out / f"ct_{split}_labels.csv").write_text(_labels_csv(rows["labels"]), encoding="utf-8")
        _dump_jsonl(out / f"ct_{split}_studies.jsonl", rows["studies"])
        files += [main, f"ct_{split}_labels.csv", f"ct_{split}_studies.jsonl"]
        counts[f"ct_{split}_studies"], counts[f"ct_{split}_records"] = n, len(rows["records"])
    for split, n in (("train", cfg.n_rs_train), ("test", cfg.n_rs_test)):
        rows = _rs_split(out, split, n, cfg)
        main = f"rs_{split}.json" if split == "train" else f"rs_{split}.jsonl"
        (_dump_json if split == "train" else _dump_jsonl)(out / main, rows["records"])
        _dump_jsonl(out / f"rs_{split}_scenes.jsonl", rows["scenes"])
        files += [main, f"rs_{split}_scenes.jsonl"]
        if split == "test":
            _dump_jsonl(out / "rs_test_fitrsfg.jsonl", rows["fitrsfg"])
            files.append("rs_test_fitrsfg.jsonl")
        counts[f"rs_{split}_scenes"], counts[f"rs_{split}_records"] = n, len(rows["records"])
    if cfg.n_niah:
        _dump_jsonl(out / "niah_test.jsonl", _niah(out, cfg))
        files.append("niah_test.jsonl")
        counts["niah_test_records"] = cfg.n_niah
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "files": files,
        "counts": counts,
        "findings": list(RENDERABLE_FINDINGS),
        "conventions": {
            "paths": "relative to the folder holding this manifest",
            "layout": "series = CT slices as an ordered series; grid = thumbnail + tiles; images = list",
            "slices": "1-based, inferior -> superior, in the study's own slice order",
            "tiles": "1-based row/column; image padded centred to a multiple of tile_size",
            "sides": "patient's left/right",
        },
    }
    _dump_json(out / "manifest.json", manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m domain_data.synthetic.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-ct-train", type=int, default=40)
    parser.add_argument("--n-ct-test", type=int, default=20)
    parser.add_argument("--n-rs-train", type=int, default=40)
    parser.add_argument("--n-rs-test", type=int, default=20)
    parser.add_argument("--ct-size", type=int, default=128, help="in-plane pixels of the CT phantoms")
    parser.add_argument("--ct-slices", type=int, nargs=2, default=(100, 160), metavar=("MIN", "MAX"))
    parser.add_argument("--dicom-every", type=int, default=4, help="every N-th study as DICOM (0: none)")
    parser.add_argument("--tile-size", type=int, default=336)
    parser.add_argument("--n-niah", type=int, default=0, help="needle records (shared haystack)")
    parser.add_argument("--niah-images", type=int, default=100)
    parser.add_argument("--niah-size", type=int, default=112)
    args = parser.parse_args(argv)
    manifest = build_synthetic_sets(
        args.out,
        args.seed,
        args.n_ct_train,
        args.n_ct_test,
        args.n_rs_train,
        args.n_rs_test,
        ct_size=args.ct_size,
        ct_slices=tuple(args.ct_slices),
        dicom_every=args.dicom_every,
        tile_size=args.tile_size,
        n_niah=args.n_niah,
        niah_images=args.niah_images,
        niah_size=args.niah_size,
    )
    print(json.dumps(manifest["counts"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
