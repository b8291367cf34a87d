"""Seeded synthetic data for demos, training the demo model and testing the real loaders.

* :mod:`.ct_phantom` - chest-CT phantoms in HU with CT-RATE findings, a small ``phantom_hu`` slab for
  loader tests; NIfTI / DICOM writers;
* :mod:`.dicom_writer` - any HU volume as a DICOM CT series (messy variants for loader tests);
* :mod:`.satellite` - scenes with objects in known tiles of the tiler's grid; GeoTIFF writer;
* :mod:`.qa` - questions with canonical answers, CT-RATE style reports, LLaVA / FIT-RSFG records;
* :mod:`.niah` - visual needle-in-a-haystack samples;
* :mod:`.build` - the train / held-out sets on disk (``python -m domain_data.synthetic.build``).

Everything is deterministic in its seed.
"""

from domain_data.synthetic.ct_phantom import (
    RENDERABLE_FINDINGS,
    Finding,
    Phantom,
    make_ct_phantom,
    write_dicom_series,
    write_nifti,
)
from domain_data.synthetic.errors import SyntheticDataError
from domain_data.synthetic.niah import NIAHSample, make_niah
from domain_data.synthetic.qa import ct_questions, ct_report, scene_questions
from domain_data.synthetic.satellite import OBJECT_KINDS, Scene, make_scene, tile_grid, tile_of, write_geotiff

__all__ = [
    "OBJECT_KINDS",
    "RENDERABLE_FINDINGS",
    "Finding",
    "NIAHSample",
    "Phantom",
    "Scene",
    "SyntheticDataError",
    "ct_questions",
    "ct_report",
    "make_ct_phantom",
    "make_niah",
    "make_scene",
    "scene_questions",
    "tile_grid",
    "tile_of",
    "write_dicom_series",
    "write_geotiff",
    "write_nifti",
]
