"""Write a HU volume as a DICOM CT series (one file per slice), reproducibly, for loader tests and demos.

The volume is ``(z, y, x)``: ``x`` runs along ``row_direction`` (image columns), ``y`` along
``column_direction`` (image rows) and ``z`` along their cross product (the slice normal); the default
axial orientation ``[1, 0, 0, 0, 1, 0]`` in LPS is the one of :mod:`ct_phantom`. Slice ``k`` is written
at ``origin + offset_k * normal`` with ``offset_k = k * spacing_z`` unless ``slice_offsets_mm`` is given
(uneven spacing for loader tests).

Everything a loader has to cope with can be switched on: shuffled file names, wrong or explicit
InstanceNumbers, a localizer image in the same series, per-file rescale slope/intercept, compressed
transfer syntaxes, oblique orientation, another modality or ImageType, one series split over several
calls (``series_uid``), and fake patient identifiers for privacy tests (never real people: the defaults
leave the identifying attributes empty). UIDs derive from ``uid_seed`` so the same call writes the same
bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domain_data.synthetic.errors import SyntheticDataError

AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "implicit": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless (pydicom encodes it natively)
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless (needs pylibjpeg-openjpeg)
}


@dataclass(frozen=True)
class FakePatient:
    """Obviously fake identifiers, distinctive enough to grep for in logs and written files."""

    name: str = "ZZFAKE^PATIENT"
    patient_id: str = "FAKEID-000000"
    birth_date: str = "19000101"
    accession: str = "FAKEACC000000"
    institution: str = "Fake Synthetic Institution"

    def identifiers(self) -> tuple[str, ...]:
        """The strings that must never leak."""
        return (self.name, self.patient_id, self.birth_date, self.accession, self.institution)


def fake_patient(seed: int) -> FakePatient:
    """A seeded :class:`FakePatient` (``ZZFAKE^PATIENT1234`` ...)."""
    number = int(np.random.default_rng(seed).integers(0, 10**6))
    return FakePatient(
        name=f"ZZFAKE^PATIENT{number:06d}",
        patient_id=f"FAKEID-{number:06d}",
        birth_date=f"19{number % 90 + 10:02d}0{number % 9 + 1}1{number % 9}",
        accession=f"FAKEACC{number:06d}",
        institution=f"Fake Synthetic Institution {number % 97}",
    )


@dataclass
class DicomSeries:
    """What :func:`write_ct_series` wrote; ``paths`` in slice order (volume index 0 first)."""

    folder: Path
    paths: list[Path]
    study_uid: str
    series_uid: str
    instance_numbers: list[int]
    positions: list[tuple[float, float, float]]
    localizer: Path | None = None
    transfer_syntax: str = TRANSFER_SYNTAXES["explicit"]


def _uid(uid_seed: str, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[uid_seed, *[str(p) for p in parts]]))


def _ds_number(value: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def _orientation(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.asarray(orientation, dtype=np.float64)
    if values.shape != (6,):
        raise SyntheticDataError(f"orientation must have 6 direction cosines, got {list(orientation)}")
    row, col = values[:3], values[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-4 or abs(np.linalg.norm(col) - 1) > 1e-4 or abs(row @ col) > 1e-4:
        raise SyntheticDataError(f"orientation {list(orientation)} must be two orthonormal unit vectors")
    return row, col, np.cross(row, col)


def _stored_pixels(hu_slice: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Stored values and PixelRepresentation (0 unsigned, 1 signed) for HU = stored * slope + intercept."""
    stored = np.round((hu_slice.astype(np.float64) - intercept) / slope)
    if stored.min() >= 0 and stored.max() <= 65535:
        return stored.astype(np.uint16), 0
    if stored.min() >= -32768 and stored.max() <= 32767:
        return stored.astype(np.int16), 1
    raise SyntheticDataError(
        f"HU range [{hu_slice.min()}, {hu_slice.max()}] does not fit 16 bits with slope {slope} and "
        f"intercept {intercept}: choose another rescale"
    )


def _base_dataset(uid_seed: str, study_uid: str, series_uid: str, patient: FakePatient | None, meta: dict):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.Modality = meta.get("modality", "CT")
    ds.Manufacturer = "longllava-suite synthetic"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = _uid(uid_seed, "frame")
    ds.StudyDate, ds.StudyTime = "20200101", "120000"
    ds.SeriesDate, ds.SeriesTime = "20200101", "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = int(meta.get("series_number", 1))
    ds.SeriesDescription = meta.get("series_description", "Synthetic chest CT")
    ds.BodyPartExamined = "CHEST"
    ds.KVP = "120"
    ds.PatientName = patient.name if patient else ""
    ds.PatientID = patient.patient_id if patient else ""
    ds.PatientBirthDate = patient.birth_date if patient else ""
    ds.PatientSex = "O"
    ds.AccessionNumber = patient.accession if patient else ""
    if patient:
        ds.InstitutionName = patient.institution
    ds.ReferringPhysicianName = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    return ds


def _finish(ds, sop_uid: str, transfer_syntax: str, path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds.SOPInstanceUID = sop_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = TRANSFER_SYNTAXES["explicit"]
    ds.file_meta = meta
    if transfer_syntax == TRANSFER_SYNTAXES["implicit"]:
        meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax != TRANSFER_SYNTAXES["explicit"]:
        try:
            ds.compress(transfer_syntax, generate_instance_uid=False)  # keep the seeded UID: same call, same bytes
        except Exception as error:  # a missing encoder plugin, reported with what to install
            raise SyntheticDataError(
                f"cannot encode {path.name} with transfer syntax {transfer_syntax}: {error} "
                "(install the pylibjpeg plugins, extra 'dicom-codecs', or use transfer_syntax='explicit')"
            ) from error
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def write_ct_series(
    hu: np.ndarray,
    spacing: Sequence[float],
    out_dir: str | Path,
    *,
    origin: Sequence[float] | None = None,
    orientation: Sequence[float] = AXIAL,
    slice_offsets_mm: Sequence[float] | None = None,
    rescale: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, -1024.0),
    patient: FakePatient | None = None,
    shuffle_files: bool = False,
    wrong_instance_numbers: bool = False,
    instance_numbers: Sequence[int] | None = None,
    add_localizer: bool = False,
    transfer_syntax: str = "explicit",
    uid_seed: str = "synthetic",
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Synthetic chest CT",
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    file_prefix: str = "CT",
    seed: int = 0,
) -> DicomSeries:
    """Write ``hu`` ``(z, y, x)`` with ``spacing`` ``(z, y, x)`` mm as one DICOM CT series in ``out_dir``.

    ``rescale``: one ``(slope, intercept)`` for all slices or one per slice (HU = stored * slope +
    intercept; stored values are uint16 when they fit, else int16). ``shuffle_files`` permutes the file
    names, ``wrong_instance_numbers`` permutes InstanceNumber (both seeded by ``seed``) so that only
    ImagePositionPatient gives the order; ``instance_numbers`` sets InstanceNumber slice by slice instead.
    ``transfer_syntax``: ``explicit``, ``implicit``, ``rle`` or ``jpeg2000`` (or a UID). ``origin`` is the
    LPS position of voxel (0, 0, 0); default: the volume centred on (0, 0, 0). ``modality`` and
    ``image_type`` are written as given on every slice (the SOP class stays CT Image Storage), so a
    non-CT series or a localizer written as a series of its own can be made. Writing several series, or
    several parts of one series (same ``series_uid``), into one folder needs distinct ``uid_seed`` and
    ``file_prefix``; ``series_uid`` defaults to one derived from ``uid_seed`` and ``series_number``.
    """
    out_dir = Path(out_dir)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise SyntheticDataError(f"volume for {out_dir} must be 3-D (z, y, x), got shape {hu.shape}")
    nz, ny, nx = hu.shape
    sz, sy, sx = (float(s) for s in spacing)
    row, col, normal = _orientation(orientation)
    if origin is None:
        origin = -(row * (nx - 1) * sx + col * (ny - 1) * sy + normal * (nz - 1) * sz) / 2
    origin = np.asarray(origin, dtype=np.float64)
    offsets = (
        np.arange(nz) * sz if slice_offsets_mm is None else np.asarray(slice_offsets_mm, dtype=np.float64)
    )
    if offsets.shape != (nz,):
        raise SyntheticDataError(f"slice_offsets_mm needs {nz} values, got {offsets.shape[0]}")
    rescales = [tuple(rescale)] * nz if np.ndim(rescale) == 1 else [tuple(r) for r in rescale]
    if len(rescales) != nz:
        raise SyntheticDataError(f"rescale needs one (slope, intercept) or {nz} of them, got {len(rescales)}")
    syntax = TRANSFER_SYNTAXES.get(transfer_syntax, transfer_syntax)
    if instance_numbers is not None:
        if wrong_instance_numbers:
            raise SyntheticDataError(
                f"series for {out_dir}: give instance_numbers or wrong_instance_numbers=True, not both"
            )
        if len(instance_numbers) != nz:
            raise SyntheticDataError(f"instance_numbers needs {nz} values, got {len(instance_numbers)}")

    rng = np.random.default_rng(seed)
    file_order = rng.permutation(nz) if shuffle_files else np.arange(nz)
    if instance_numbers is None:
        instance_numbers = (rng.permutation(nz) if wrong_instance_numbers else np.arange(nz)) + 1
    study_uid = _uid(uid_seed, "study")
    series_uid = _uid(uid_seed, "series", series_number) if series_uid is None else series_uid
    meta = {"series_number": series_number, "series_description": series_description, "modality": modality}
    out_dir.mkdir(parents=True, exist_ok=True)

    paths, positions = [], []
    for k in range(nz):
        position = origin + offsets[k] * normal
        slope, intercept = rescales[k]
        stored, signed = _stored_pixels(hu[k], slope, intercept)
        ds = _base_dataset(uid_seed, study_uid, series_uid, patient, meta)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*row, *col)]
        ds.SliceLocation = _ds_number(float(position @ normal))
        ds.PixelSpacing = [_ds_number(sy), _ds_number(sx)]  # (row spacing, column spacing)
        ds.SliceThickness = _ds_number(sz)
        ds.Rows, ds.Columns = ny, nx
        ds.PixelRepresentation = signed
        ds.RescaleSlope, ds.RescaleIntercept = _ds_number(slope), _ds_number(intercept)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        path = out_dir / f"{file_prefix}{int(file_order[k]):04d}.dcm"
        _finish(ds, _uid(uid_seed, "sop", series_number, k), syntax, path)
        paths.append(path)
        positions.append(tuple(float(v) for v in position))

    localizer = (
        _write_localizer(
            hu,
            (sz, sy, sx),
            out_dir,
            uid_seed,
            study_uid,
            series_uid,
            patient,
            meta,
            file_prefix,
            origin,
            normal,
        )
        if add_localizer
        else None
    )
    return DicomSeries(
        folder=out_dir,
        paths=paths,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_numbers=[int(n) for n in instance_numbers],
        positions=positions,
        localizer=localizer,
        transfer_syntax=syntax,
    )


def _write_localizer(
    hu, spacing, out_dir, uid_seed, study_uid, series_uid, patient, meta, prefix, origin, normal
):
    """A coronal scout (mean over y) in the same series, ImageType LOCALIZER: loaders must drop it."""
    sz, _, sx = spacing
    projection = hu.mean(axis=1)[::-1]  # (z, x), superior row first as a scout is displayed
    stored, signed = _stored_pixels(projection, 1.0, -1024.0)
    ds = _base_dataset(uid_seed, study_uid, series_uid, patient, meta)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = hu.shape[0] + 1
    top = origin + (hu.shape[0] - 1) * sz * normal
    ds.ImagePositionPatient = [_ds_number(v) for v in top]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]  # coronal
    ds.PixelSpacing = [_ds_number(sz), _ds_number(sx)]
    ds.SliceThickness = "1"
    ds.Rows, ds.Columns = projection.shape
    ds.PixelRepresentation = signed
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path = out_dir / f"{prefix}_LOCALIZER.dcm"
    _finish(ds, _uid(uid_seed, "localizer"), TRANSFER_SYNTAXES["explicit"], path)
    return path


def read_series_hu(folder: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Minimal reference reader for tests: non-localizer slices of one series sorted by position along
    the normal, rescaled to HU. Returns (hu (z, y, x) float32, offsets along the normal in mm)."""
    import pydicom

    slices = []
    for path in sorted(Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if "LOCALIZER" in list(ds.ImageType) or (series_uid and ds.SeriesInstanceUID != series_uid):
            continue
        row_col = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        offset = float(
            np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ np.cross(row_col[:3], row_col[3:])
        )
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((offset, hu))
    if not slices:
        raise SyntheticDataError(f"no CT slices found in {folder}")
    slices.sort(key=lambda item: item[0])
    return np.stack([s[1] for s in slices]), np.array([s[0] for s in slices])


def zip_series(folder: str | Path, zip_path: str | Path, arc_prefix: str = "") -> Path:
    """Zip the ``.dcm`` files of ``folder`` reproducibly (sorted names, fixed timestamps), as an upload
    would arrive; ``arc_prefix`` puts them under a folder inside the archive."""
    import zipfile

    folder, zip_path = Path(folder), Path(zip_path)
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise SyntheticDataError(f"no .dcm files in {folder} to zip")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(f"{arc_prefix}{path.name}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    return zip_path
