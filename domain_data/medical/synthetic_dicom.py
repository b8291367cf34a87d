"""Seeded synthetic CT studies written as real DICOM files or NIfTI (tests, benchmarks, demos).

The phantom is a chest-like slab: air outside an elliptic body (soft tissue ~40 HU), two lungs
(~ -850 HU), a vertebral body (~ 700 HU) posterior, and a small dense marker in the patient's
left-anterior quadrant so that orientation errors are visible. Everything is deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom_hu(num_slices: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A (z, y, x) float32 HU phantom in canonical LPS orientation (x -> Left, y -> Posterior)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    cy, cx = rows / 2, columns / 2
    body = ((x - cx) / (0.42 * columns)) ** 2 + ((y - cy) / (0.32 * rows)) ** 2 <= 1
    right_lung = ((x - 0.33 * columns) / (0.11 * columns)) ** 2 + ((y - 0.47 * rows) / (0.17 * rows)) ** 2 <= 1
    left_lung = ((x - 0.67 * columns) / (0.11 * columns)) ** 2 + ((y - 0.47 * rows) / (0.17 * rows)) ** 2 <= 1
    spine = ((x - cx) / (0.05 * columns)) ** 2 + ((y - 0.72 * rows) / (0.05 * rows)) ** 2 <= 1
    marker = ((x - 0.62 * columns) / (0.03 * columns)) ** 2 + ((y - 0.3 * rows) / (0.03 * rows)) ** 2 <= 1
    plane = np.full((rows, columns), -1000.0, dtype=np.float32)
    plane[body] = 40.0
    plane[right_lung | left_lung] = -850.0
    plane[spine] = 700.0
    plane[marker] = 1500.0
    volume = np.repeat(plane[None], num_slices, axis=0)
    volume += rng.normal(0.0, 8.0, size=(num_slices, 1, 1)).astype(np.float32)  # per-slice offset
    return volume


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float] = (2.0, 0.7, 0.7),
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-180.0, -180.0, -300.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    description: str = "CHEST 2mm",
    identifiers: dict | None = None,
    instance_numbers: Sequence[int] | None = None,
    slice_positions_mm: Sequence[float] | None = None,
    file_order_seed: int | None = None,
    prefix: str = "img",
) -> list[Path]:
    """Write ``hu`` (slices, rows, columns) as one DICOM series, slice k at ``origin + offset_k * normal``.

    ``hu[k]`` is stored as displayed: row r along the column direction cosines, column c along the row
    direction cosines. ``file_order_seed`` shuffles which file name each slice gets; ``instance_numbers``
    overrides InstanceNumber (to check that sorting ignores it). Returns the written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, columns = hu.shape
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    offsets = np.asarray(slice_positions_mm if slice_positions_mm is not None else np.arange(n) * spacing_mm[0])
    names = np.arange(n)
    if file_order_seed is not None:
        names = np.random.default_rng(file_order_seed).permutation(n)
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    paths = []
    for k in range(n):
        number = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        dataset = _slice_dataset(stored[k], series_uid, study_uid, modality, image_type, description,
                                 identifiers or {}, orientation, np.asarray(origin) + offsets[k] * normal,
                                 spacing_mm, slope, intercept, number)
        path = folder / f"{prefix}_{int(names[k]):04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(pixels: np.ndarray, series_uid: str, study_uid: str, modality: str,
                   image_type: Sequence[str], description: str, identifiers: dict,
                   orientation: Sequence[float], position: np.ndarray, spacing_mm: tuple[float, float, float],
                   slope: float, intercept: float, instance_number: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = modality
    dataset.ImageType = list(image_type)
    dataset.SeriesDescription = description
    for keyword, value in identifiers.items():
        setattr(dataset, keyword, value)
    dataset.InstanceNumber = instance_number
    dataset.ImageOrientationPatient = [float(v) for v in orientation]
    dataset.ImagePositionPatient = [round(float(v), 4) for v in position]
    dataset.PixelSpacing = [float(spacing_mm[1]), float(spacing_mm[2])]
    dataset.SliceThickness = float(spacing_mm[0])
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 1
    dataset.RescaleSlope = slope
    dataset.RescaleIntercept = intercept
    dataset.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return dataset


def write_nifti(path: str | Path, hu_zyx: np.ndarray, spacing_mm: tuple[float, float, float] = (2.0, 0.7, 0.7),
                axcodes: tuple[str, str, str] = ("L", "P", "S")) -> Path:
    """Write a canonical (z, y, x) HU volume as NIfTI with voxel axes in orientation ``axcodes``."""
    import nibabel as nib

    data_xyz = np.asarray(hu_zyx, dtype=np.float32).transpose(2, 1, 0)
    affine_lps = np.diag([spacing_mm[2], spacing_mm[1], spacing_mm[0], 1.0])
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    start = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(data_xyz, transform)
    affine = affine_ras @ nib.orientations.inv_ornt_aff(transform, data_xyz.shape)
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    nib.save(image, str(path))
    return Path(path)


__all__ = ["AXIAL", "phantom_hu", "write_ct_series", "write_nifti", "pydicom"]
