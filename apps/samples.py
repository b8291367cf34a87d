"""Sample inputs for the 'Load sample' buttons, generated once (seeded) into the app's cache dir.

Nothing large ships in git: the synthetic generators in ``domain_data.synthetic`` render a CT
phantom (NIfTI) and a satellite scene (GeoTIFF) on first use; later clicks reuse the files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

SAMPLE_SEED = 7
SAMPLE_CT_NAME = "sample_ct.nii.gz"
SAMPLE_CT_SLICES = 120
SAMPLE_CT_SIZE = 256
SAMPLE_RASTER_NAME = "sample_scene.tif"
SAMPLE_SCENE_SIZE = (1008, 1344)  # (height, width): a 3 x 4 grid of 336 px tiles at full resolution

_LOCK = threading.Lock()


def sample_ct_study(folder: Path, seed: int = SAMPLE_SEED) -> Path:
    """A synthetic CT phantom as NIfTI in ``folder`` (written on first call)."""
    from domain_data.synthetic import ct_phantom

    def write(path: Path) -> None:
        phantom = ct_phantom.make_ct_phantom(seed=seed, n_slices=SAMPLE_CT_SLICES, size=SAMPLE_CT_SIZE)
        ct_phantom.write_nifti(phantom, path)

    return _cached(Path(folder) / f"seed{seed}_{SAMPLE_CT_NAME}", write, suffix=".nii.gz")


def sample_raster(folder: Path, seed: int = SAMPLE_SEED) -> Path:
    """A synthetic georeferenced satellite scene as GeoTIFF in ``folder`` (written on first call)."""
    from domain_data.synthetic import satellite

    def write(path: Path) -> None:
        scene = satellite.make_scene(seed=seed, height=SAMPLE_SCENE_SIZE[0], width=SAMPLE_SCENE_SIZE[1])
        satellite.write_geotiff(scene, path)

    return _cached(Path(folder) / f"seed{seed}_{SAMPLE_RASTER_NAME}", write, suffix=".tif")


def _cached(path: Path, write: Callable[[Path], None], suffix: str) -> Path:
    """``path``, written by ``write`` once; concurrent first clicks wait instead of racing."""
    with _LOCK:
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"partial-{os.getpid()}{suffix}")  # writers pick the format by suffix
        write(partial)
        partial.replace(path)
    return path
