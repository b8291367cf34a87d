"""Load a CT study (NIfTI, DICOM folder, DICOM .zip, CT-RATE volume) as a Hounsfield-unit volume.

Canonical orientation of every :class:`CTVolume` (whatever the source):

* ``hu`` is float32 with axes ``(z, y, x)``;
* x increases towards the patient's **Left**, y towards **Posterior**, z towards **Superior**
  (DICOM "LPS+"; nibabel axis codes ``('L', 'P', 'S')``), so ``hu[0]`` is the most inferior slice and
  ``hu[k]`` displayed as an image (rows = y, columns = x) is the usual radiological axial view
  (anterior at the top, patient's right on the image's left);
* ``affine`` maps a voxel index ``(x, y, z, 1)`` of ``hu`` (note: x first) to world **RAS+** mm, the
  NIfTI / nibabel convention, for both DICOM and NIfTI sources.

Axes are only permuted and flipped to reach this orientation (the closest canonical orientation);
oblique studies are not resampled, their true direction cosines stay in ``affine``.
"""

from __future__ import annotations

import ast
import gzip
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from domain_data.medical import dicom
from domain_data.medical.errors import CTInputError

CANONICAL_AXCODES: tuple[str, str, str] = ("L", "P", "S")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_FILE_SUFFIXES = ("", ".dcm", ".dicom", ".ima")
MAX_VOXELS = dicom.MAX_VOXELS
# Fraction of voxels in the HU range of air [-1100, -900] above which a volume is taken as already in HU.
_AIR_FRACTION_FOR_HU = 0.02


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units, canonical orientation (see the module docstring)."""

    hu: np.ndarray  # float32 (z, y, x); x -> Left, y -> Posterior, z -> Superior
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    affine: np.ndarray  # 4x4, voxel (x, y, z, 1) -> RAS+ mm
    metadata: dict = field(default_factory=dict)  # non-identifying fields only
    z_offsets_mm: np.ndarray | None = None  # (z,) slice-plane positions from slice 0; uneven DICOM spacing
    orientation: str = "".join(CANONICAL_AXCODES)

    def __post_init__(self) -> None:
        if self.z_offsets_mm is None:
            self.z_offsets_mm = np.arange(self.hu.shape[0], dtype=np.float64) * self.spacing_mm[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return int(self.hu.shape[0])


# -------------------------------------------------------------------------------------------- entry


def load_ct(
    path: str | Path,
    series_uid: str | None = None,
    ct_rate_metadata: dict | None = None,
    *,
    ct_rate_rescale: Literal["auto", "apply", "skip"] = "auto",
    max_voxels: int = MAX_VOXELS,
) -> CTVolume:
    """Load a NIfTI file, a DICOM folder / .zip / single file, or a CT-RATE volume as a :class:`CTVolume`.

    ``series_uid`` picks a DICOM series (default: the largest CT series; the others are listed in
    ``metadata['other_series']``). ``ct_rate_metadata`` is the CT-RATE metadata CSV row of a NIfTI volume
    (RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing): its spacing replaces the header's and its
    slope/intercept are applied once — ``ct_rate_rescale='auto'`` skips them when the header already
    scales the data or the values already look like HU (CT-RATE v2), ``'apply'`` / ``'skip'`` force it.
    Raises :class:`CTInputError` for anything that cannot be read, with the file and what to do.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CTInputError(f"{path}: no such file or folder; give a NIfTI file, a DICOM folder or a .zip")
    if path.is_dir():
        return _load_dicom_folder(path, series_uid, "dicom_folder", str(path), max_voxels)
    kind = _sniff(path)
    if kind == "zip":
        with tempfile.TemporaryDirectory(prefix="ct_upload_") as scratch:
            folder = dicom.safe_extract_zip(path, Path(scratch))
            return _load_dicom_folder(folder, series_uid, "dicom_zip", str(path), max_voxels)
    if kind == "nifti":
        return _load_nifti(path, ct_rate_metadata, ct_rate_rescale, max_voxels)
    return _load_dicom_files([path], series_uid, "dicom_file", str(path), max_voxels)


def _sniff(path: Path) -> Literal["zip", "nifti", "dicom"]:
    """Decide the reader from the content and check it agrees with the file name."""
    if not path.is_file():
        raise CTInputError(f"{path}: not a regular file; give a NIfTI file, a DICOM folder or a .zip")
    try:
        with open(path, "rb") as handle:
            head = handle.read(352)
    except OSError as error:
        raise CTInputError(f"{path}: cannot be read ({type(error).__name__}); check the file's permissions") from None
    if not head:
        raise CTInputError(f"{path}: the file is empty (0 bytes); upload the study again")
    name = path.name.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
    is_gzip, is_zip = head[:2] == b"\x1f\x8b", head[:4] == b"PK\x03\x04"
    is_nifti = head[344:348] in (b"n+1\x00",) or head[4:8] == b"n+2\x00"
    is_dicom = head[128:132] == b"DICM"
    if suffix == ".zip":
        if not is_zip:
            raise CTInputError(f"{path}: named .zip but is not a zip archive; give the real archive")
        return "zip"
    if suffix == ".nii.gz":
        if not is_gzip:
            raise CTInputError(f"{path}: named .nii.gz but is not gzip-compressed; rename it to what it is "
                               "(.nii for uncompressed NIfTI)")
        return "nifti"
    if suffix == ".nii":
        if not is_nifti:
            what = "a DICOM file" if is_dicom else "gzip data (rename to .nii.gz)" if is_gzip else "not NIfTI"
            raise CTInputError(f"{path}: named .nii but the content is {what}; give a NIfTI-1/2 single file")
        return "nifti"
    if suffix in DICOM_FILE_SUFFIXES and is_dicom:
        return "dicom"
    hint = ("it looks like a DICOM file: name it .dcm" if is_dicom else "it looks like a zip: name it .zip"
            if is_zip else "it looks like gzip data: NIfTI must be named .nii.gz" if is_gzip else
            "it is none of NIfTI, DICOM or zip")
    raise CTInputError(f"{path}: unsupported file type {suffix or '(no extension)'!r} ({hint}); give a "
                       ".nii/.nii.gz file, a DICOM folder, a .dcm file or a .zip of a DICOM series")


# -------------------------------------------------------------------------------------------- DICOM


def _load_dicom_folder(folder: Path, series_uid: str | None, source_kind: str, source: str,
                       max_voxels: int) -> CTVolume:
    files = dicom.list_files(folder)
    if not files:
        raise CTInputError(f"{source}: no files found; give a folder holding the .dcm files of a CT series")
    return _load_dicom_files(files, series_uid, source_kind, source, max_voxels)


def _load_dicom_files(files: list[Path], series_uid: str | None, source_kind: str, source: str,
                      max_voxels: int) -> CTVolume:
    redactor = dicom.Redactor()
    headers = [h for h in (dicom.read_header(f, redactor) for f in files) if h is not None]
    if not headers:
        raise CTInputError(f"{source}: none of the {len(files)} file(s) is DICOM; give the folder or .zip "
                           "that holds the CT series' .dcm files")
    choice = dicom.choose_series(headers, source, series_uid, redactor)
    choice.skipped_files = len(files) - len(headers)
    volume_kji = dicom.read_pixels(choice, source, redactor, max_voxels)  # (k, j, i) = (slice, row, column)
    affine_ras = LPS_TO_RAS @ dicom.series_affine_lps(choice)
    try:
        hu, affine, spacing, offsets, original = _canonicalize(volume_kji.transpose(2, 1, 0), affine_ras,
                                                               choice.offsets_mm)
    except CTInputError as error:
        raise redactor.error(f"{source}: {error}") from None
    first = choice.headers[0]
    metadata = {
        "source_kind": source_kind,
        "modality": first.modality,
        "series_description": redactor.scrub(first.series_description),
        "series_uid": choice.series_uid,
        "slice_count": int(hu.shape[0]),
        "source_slices": len(choice.headers),
        "other_series": [{**s, "description": redactor.scrub(s["description"])} for s in choice.other_series],
        "dropped_localizers": choice.dropped_localizers,
        "dropped_duplicate_positions": choice.dropped_duplicates,
        "skipped_non_dicom_files": choice.skipped_files,
        "transfer_syntaxes": sorted({h.transfer_syntax for h in choice.headers if h.transfer_syntax}),
        "uneven_spacing": next((w for w in choice.warnings if w.startswith("uneven")), None),
        "warnings": [redactor.scrub(w) for w in choice.warnings],
        "original_orientation": original,
        "orientation": "".join(CANONICAL_AXCODES),
    }
    return CTVolume(hu, spacing, affine, metadata, offsets)


# -------------------------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path, ct_rate_metadata: dict | None, rescale: str, max_voxels: int) -> CTVolume:
    image = _open_nifti(path)
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise CTInputError(f"{path}: NIfTI of shape {shape}; a CT study is one 3D volume (x, y, z)")
    if int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise CTInputError(f"{path}: header declares {shape[0]} x {shape[1]} x {shape[2]} voxels (limit "
                           f"{max_voxels:,}); refused before reading")
    if min(shape) < 2:
        raise CTInputError(f"{path}: NIfTI of shape {shape} holds a single slice; a CT study needs a 3D volume")
    data = _read_nifti_data(image, path).reshape(shape)
    affine = np.asarray(image.affine, dtype=np.float64)
    header_scaled = _header_scales(image)
    metadata: dict = {"source_kind": "nifti", "modality": "unknown (NIfTI has no modality; assumed CT)"}
    if ct_rate_metadata is not None:
        data, affine, ct_rate_info = _apply_ct_rate_row(data, affine, ct_rate_metadata, header_scaled,
                                                        rescale, path)
        metadata.update(source_kind="ct_rate_nifti", modality="CT", ct_rate=ct_rate_info)
    _check_finite(data, path)
    try:
        hu, affine, spacing, offsets, original = _canonicalize(data, affine, None)
    except CTInputError as error:
        raise CTInputError(f"{path}: {error}") from None
    metadata.update(
        series_description="",
        slice_count=int(hu.shape[0]),
        header_scaled=header_scaled,
        uneven_spacing=None,
        warnings=[],
        original_orientation=original,
        orientation="".join(CANONICAL_AXCODES),
        other_series=[],
    )
    if float(np.percentile(hu[::4, ::8, ::8], 1)) > -200:
        metadata["warnings"].append("values do not look like Hounsfield units (no air below -200); check "
                                    "the rescale slope/intercept")
    return CTVolume(hu, spacing, affine, metadata, offsets)


def _open_nifti(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except Exception as error:  # noqa: BLE001 - nibabel raises many types on corrupt headers
        raise CTInputError(f"{path}: unreadable NIfTI header ({type(error).__name__}: "
                           f"{str(error)[:160]}); re-export the volume") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise CTInputError(f"{path}: {type(image).__name__} is not a single-file NIfTI; convert it to .nii.gz")
    return image


def _read_nifti_data(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (EOFError, OSError, ValueError, TypeError, zlib.error, gzip.BadGzipFile) as error:
        raise CTInputError(f"{path}: the voxel data is truncated or corrupt ({type(error).__name__}); "
                           "upload the complete file again") from None
    return data


def _header_scales(image: nib.Nifti1Image) -> bool:
    """True when the NIfTI header carries its own scl_slope / scl_inter (nibabel already applied them)."""
    slope, inter = image.dataobj.slope, image.dataobj.inter
    return not (np.isclose(slope, 1.0) and np.isclose(inter, 0.0))


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise CTInputError(f"{path}: {bad:,} voxel(s) are NaN or infinite; a CT volume must hold finite "
                           "Hounsfield units; fix the export")


def _parse_float_list(value: object, name: str, count: int, path: Path) -> list[float]:
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else value
        values = [float(v) for v in (parsed if isinstance(parsed, list | tuple) else [parsed])]
    except (ValueError, SyntaxError, TypeError):
        raise CTInputError(f"{path}: CT-RATE metadata {name}={value!r} is not a number list") from None
    if len(values) == 1:
        values = values * count
    if len(values) != count or not all(np.isfinite(v) and v > 0 for v in values):
        raise CTInputError(f"{path}: CT-RATE metadata {name}={value!r}: expected {count} positive numbers")
    return values


def _apply_ct_rate_row(data: np.ndarray, affine: np.ndarray, row: dict, header_scaled: bool, rescale: str,
                       path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spacing from the CSV row; slope/intercept applied exactly once (see :func:`load_ct`)."""
    try:
        slope, intercept = float(row.get("RescaleSlope", 1)), float(row.get("RescaleIntercept", 0))
    except (TypeError, ValueError):
        raise CTInputError(f"{path}: CT-RATE metadata RescaleSlope/RescaleIntercept are not numbers") from None
    info: dict = {"slope": slope, "intercept": intercept}
    if rescale == "apply":
        do_rescale, why = True, "forced by ct_rate_rescale='apply'"
    elif rescale == "skip":
        do_rescale, why = False, "skipped by ct_rate_rescale='skip'"
    elif header_scaled:
        do_rescale, why = False, "skipped: the NIfTI header already scales the data"
    elif _looks_like_hu(data):
        do_rescale, why = False, "skipped: values already in HU (air near -1000), e.g. CT-RATE v2"
    else:
        do_rescale, why = True, "applied from the metadata CSV"
    if do_rescale and (slope != 1 or intercept != 0):
        data = data * np.float32(slope) + np.float32(intercept)
    info["rescale"] = why
    if "XYSpacing" in row or "ZSpacing" in row:
        xy = _parse_float_list(row.get("XYSpacing", "[1, 1]"), "XYSpacing", 2, path)
        z = _parse_float_list(row.get("ZSpacing", 1), "ZSpacing", 1, path)
        affine = _with_spacing(affine, (xy[0], xy[1], z[0]))
        info["spacing_source"] = "CT-RATE metadata (XYSpacing, ZSpacing)"
    return data, affine, info


def _looks_like_hu(data: np.ndarray) -> bool:
    sample = data[::4, ::4, ::4]
    air = np.count_nonzero((sample > -1100) & (sample < -900))
    return air > _AIR_FRACTION_FOR_HU * sample.size


def _with_spacing(affine: np.ndarray, spacing_ijk: tuple[float, float, float]) -> np.ndarray:
    """Keep the header's axis directions (identity if degenerate), replace the voxel sizes."""
    result = affine.copy()
    for axis, size in enumerate(spacing_ijk):
        column = affine[:3, axis]
        norm = np.linalg.norm(column)
        direction = column / norm if norm > 0 else np.eye(3)[axis]
        result[:3, axis] = direction * size
    return result


# ----------------------------------------------------------------------------------- orientation


def _canonicalize(data_ijk: np.ndarray, affine_ras: np.ndarray, offsets_k: np.ndarray | None,
                  ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], np.ndarray, str]:
    """Permute/flip voxel axes (i, j, k) to (L, P, S); returns hu (z, y, x), affine, spacing, z offsets."""
    linear = affine_ras[:3, :3]
    if not np.all(np.isfinite(affine_ras)) or abs(np.linalg.det(linear)) < 1e-9:
        raise CTInputError(f"degenerate voxel-to-world affine (zero or non-finite voxel size / directions: "
                           f"voxel sizes {np.round(np.linalg.norm(linear, axis=0), 4).tolist()} mm); fix the "
                           "header's spacing and orientation")
    start = nib.orientations.io_orientation(affine_ras)
    original = "".join(nib.orientations.ornt2axcodes(start))
    transform = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(CANONICAL_AXCODES))
    data_xyz = nib.orientations.apply_orientation(data_ijk, transform)
    affine = affine_ras @ nib.orientations.inv_ornt_aff(transform, data_ijk.shape)
    hu = np.ascontiguousarray(data_xyz.transpose(2, 1, 0), dtype=np.float32)  # (x, y, z) -> (z, y, x)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)  # voxel size along x, y, z
    spacing = (float(sizes[2]), float(sizes[1]), float(sizes[0]))
    offsets = np.arange(hu.shape[0], dtype=np.float64) * spacing[0]
    source_axis = int(np.flatnonzero(transform[:, 0] == 2)[0])
    if offsets_k is not None and source_axis == 2:
        flipped = transform[source_axis, 1] < 0
        offsets = (offsets_k[-1] - offsets_k)[::-1].copy() if flipped else offsets_k.astype(np.float64)
    return hu, affine, spacing, offsets, original
