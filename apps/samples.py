"""Sample inputs for the 'Load sample' buttons, generated once (seeded) into the app's cache dir.

Nothing large ships in git: the synthetic generators in ``domain_data.synthetic`` render a CT
phantom (NIfTI) and a satellite scene (GeoTIFF) on first use, drawn like the demo model's training
data (``finetune.demo_data.DEMO_BUILD``: nodule sizes, object scale, CT matrix), so the demo model
can be asked about them. Beside each file a small JSON records what it contains (the ground truth),
which the page shows so answers can be checked. Later clicks reuse the files.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

SAMPLE_SEED = 7
SAMPLE_CT_NAME = "sample_ct.nii.gz"
SAMPLE_CT_SLICES = 120
SAMPLE_CT_SIZE = 128  # the demo build's in-plane matrix
SAMPLE_CT_FINDINGS = ("Lung nodule", "Pleural effusion")
SAMPLE_RASTER_NAME = "sample_scene.tif"
SAMPLE_SCENE_SIZE = (1008, 1344)  # (height, width): a 3 x 4 grid of 336 px tiles at full resolution
SAMPLE_TILE_SIZE = 336

_LOCK = threading.Lock()


def sample_ct_study(folder: Path, seed: int = SAMPLE_SEED) -> Path:
    """A synthetic chest-CT phantom (lung nodules, pleural effusion) as NIfTI in ``folder``."""
    from domain_data.synthetic import ct_phantom
    from finetune.demo_data import DEMO_BUILD

    def write(path: Path) -> str:
        phantom = ct_phantom.make_ct_phantom(seed, findings=list(SAMPLE_CT_FINDINGS), n_slices=SAMPLE_CT_SLICES,
                                             size=SAMPLE_CT_SIZE, finding_params=DEMO_BUILD["ct_finding_params"])
        ct_phantom.write_nifti(phantom, path)
        return ct_truth(phantom.findings)

    return _cached(Path(folder) / f"seed{seed}_{SAMPLE_CT_NAME}", write, suffix=".nii.gz")


def sample_raster(folder: Path, seed: int = SAMPLE_SEED) -> Path:
    """A synthetic georeferenced satellite scene (ships, storage tanks, buildings) as GeoTIFF in ``folder``."""
    from domain_data.synthetic import satellite
    from finetune.demo_data import DEMO_BUILD

    def write(path: Path) -> str:
        height, width = SAMPLE_SCENE_SIZE
        scene = satellite.make_scene(seed, height, width, tile_size=SAMPLE_TILE_SIZE,
                                     object_scale=DEMO_BUILD["rs_object_scale"])
        satellite.write_geotiff(scene, path)
        return scene_truth(scene)

    return _cached(Path(folder) / f"seed{seed}_{SAMPLE_RASTER_NAME}", write, suffix=".tif")


def sample_truth(path: Path) -> str:
    """What a sample file contains, in words ("" for files that are not samples)."""
    sidecar = _sidecar(path)
    return json.loads(sidecar.read_text())["truth"] if sidecar.is_file() else ""


def ct_truth(findings: dict[str, Any]) -> str:
    parts = []
    for name, finding in findings.items():
        if finding.present:
            details = [str(finding.count)] if finding.count else []
            details += [finding.side] if finding.side else []
            parts.append(f"{name} ({', '.join(details)})" if details else name)
    return "rendered findings: " + (", ".join(parts) if parts else "none")


def scene_truth(scene: Any) -> str:
    tiles: dict[str, list[tuple[int, int]]] = {}
    for item in scene.objects:
        tiles.setdefault(item.kind, []).append(item.tile(scene.height, scene.width, scene.tile_size))
    parts = [f"{len(where)} {kind}{'s' if len(where) > 1 else ''} in tile(s) "
             + ", ".join(f"row {r} col {c}" for r, c in sorted(set(where))) for kind, where in tiles.items()]
    grid = f"{scene.tile_size}-px tiles at full resolution"
    return f"objects ({grid}): " + ("; ".join(parts) if parts else "none")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".truth.json")


def _cached(path: Path, write: Callable[[Path], str], suffix: str) -> Path:
    """``path``, written by ``write`` once (it returns the truth text); concurrent first clicks wait."""
    with _LOCK:
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"partial-{os.getpid()}{suffix}")  # writers pick the format by suffix
        truth = write(partial)
        _sidecar(path).write_text(json.dumps({"truth": truth}))
        partial.replace(path)
    return path
