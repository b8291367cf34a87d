"""DICOM series reading: safe .zip extraction, series grouping, localizer removal, geometric sorting, HU.

Rules (see ARCHITECTURE.md, "Medical facts"):

* files are grouped by SeriesInstanceUID; the largest CT series is chosen unless one is asked for, and
  the others are reported (UID, modality, description, slice count);
* localizers are dropped: ImageType containing LOCALIZER, or an orientation / matrix size that differs
  from the series' majority;
* slices are sorted by ImagePositionPatient projected on the slice normal (row x column direction
  cosines), never by InstanceNumber; uneven spacing is reported;
* RescaleSlope / RescaleIntercept are applied per slice (default 1 / 0);
* compressed transfer syntaxes go through pydicom's decoders (pylibjpeg plugins, Pillow); a missing
  decoder is a :class:`CTInputError` that says which package to install.

Patient identifiers (name, ID, birth date, accession number, institution) are read only to be
redacted from every message this module produces; they are never returned.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from domain_data.medical.errors import CTInputError

# Limits for uploads. A 984-slice 512x512 study is ~260 M voxels; these leave room and stop abuse.
MAX_FILES = 20_000
MAX_ZIP_ENTRIES = 20_000
MAX_ZIP_TOTAL_BYTES = 4 * 1024**3
MAX_ZIP_RATIO = 100.0  # uncompressed / compressed size of one entry; DICOM rarely exceeds ~10
MAX_VOXELS = 600_000_000  # float32: 2.4 GB
ARCHIVE_SUFFIXES = (".zip", ".gz", ".tgz", ".tar", ".7z", ".rar", ".bz2", ".xz")
ARCHIVE_MAGICS = (b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")

IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "OtherPatientIDs",
    "ReferringPhysicianName",
)
_MIN_REDACT_LENGTH = 3


class Redactor:
    """Collects identifier values seen in headers and removes them from any text we emit."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def collect(self, dataset: pydicom.Dataset) -> None:
        for keyword in IDENTIFIER_KEYWORDS:
            value = dataset.get(keyword)
            if value is None:
                continue
            text = str(value).strip()
            parts = {text, text.replace("^", " ").strip()}
            parts.update(p for p in text.replace("^", " ").split() if p)
            self._values.update(p for p in parts if len(p) >= _MIN_REDACT_LENGTH)

    def scrub(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            start = text.lower().find(value.lower())
            while start >= 0:
                text = text[:start] + "[redacted]" + text[start + len(value) :]
                start = text.lower().find(value.lower(), start + len("[redacted]"))
        return text

    def error(self, message: str) -> CTInputError:
        return CTInputError(self.scrub(message))


# ---------------------------------------------------------------------------------------------- zip


def _zip_entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Why one archive entry is refused, or None."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        return f"entry {name!r} points outside the archive (path traversal)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"entry {name!r} is a symbolic link"
    if info.flag_bits & 0x1:
        return f"entry {name!r} is encrypted"
    if not info.is_dir() and name.lower().endswith(ARCHIVE_SUFFIXES):
        return f"entry {name!r} is itself an archive (nested archives are not opened)"
    if info.file_size > 0 and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
        ratio = info.file_size / max(info.compress_size, 1)
        return f"entry {name!r} expands {ratio:.0f}x (limit {MAX_ZIP_RATIO:.0f}x): looks like a zip bomb"
    return None


def safe_extract_zip(zip_path: Path, destination: Path) -> Path:
    """Extract ``zip_path`` into ``destination`` (an empty temporary folder) refusing unsafe archives.

    Refused: path traversal or absolute names, symlink or encrypted entries, nested archives, more than
    :data:`MAX_ZIP_ENTRIES` entries, more than :data:`MAX_ZIP_TOTAL_BYTES` uncompressed, or any entry
    expanding more than :data:`MAX_ZIP_RATIO` times (checked on the declared sizes first and again on
    the bytes actually written, so a lying header cannot get through).
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise CTInputError(f"{zip_path.name}: not a readable .zip archive ({error}); upload the DICOM "
                           "series as a plain .zip of .dcm files or as a folder") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise CTInputError(f"{zip_path.name}: {len(infos)} entries (limit {MAX_ZIP_ENTRIES}); "
                               "upload one series at a time")
        declared_total = sum(info.file_size for info in infos)
        if declared_total > MAX_ZIP_TOTAL_BYTES:
            raise CTInputError(f"{zip_path.name}: expands to {declared_total / 1024**3:.1f} GiB (limit "
                               f"{MAX_ZIP_TOTAL_BYTES / 1024**3:.0f} GiB): refused as a possible zip bomb")
        for info in infos:
            problem = _zip_entry_problem(info)
            if problem:
                raise CTInputError(f"{zip_path.name}: {problem}; the archive was not extracted")
        written_total = 0
        for index, info in enumerate(infos):
            if info.is_dir():
                continue
            target = destination / f"{index:06d}.dcm"  # our own flat names: no user path is ever used
            try:
                written_total += _copy_entry(archive, info, target, zip_path.name, written_total)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as error:
                raise CTInputError(f"{zip_path.name}: entry {info.filename!r} cannot be extracted "
                                   f"({type(error).__name__}: {str(error)[:120]}); the archive is corrupt "
                                   "or uses an unsupported compression: re-create it as a plain .zip") from None
    return destination


def _copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, zip_name: str,
                written_before: int) -> int:
    """Stream one entry to ``target`` with hard byte limits; returns the bytes written."""
    limit = min(info.file_size, MAX_ZIP_TOTAL_BYTES - written_before)
    written = 0
    with archive.open(info) as source, open(target, "wb") as sink:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise CTInputError(f"{zip_name}: entry {info.filename!r} holds more data than its header "
                                   "declares: refused as a possible zip bomb")
            if written == len(chunk) and chunk.startswith(ARCHIVE_MAGICS):
                raise CTInputError(f"{zip_name}: entry {info.filename!r} is itself an archive "
                                   "(nested archives are not opened)")
            sink.write(chunk)
    return written


# ------------------------------------------------------------------------------------------ headers


@dataclass
class SliceHeader:
    """What is needed from one DICOM file to group, filter and sort it (no identifiers)."""

    path: Path
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    series_description: str
    rows: int
    columns: int
    has_pixels: bool
    orientation: np.ndarray | None  # (6,) row then column direction cosines, LPS
    position: np.ndarray | None  # (3,) ImagePositionPatient, LPS mm
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    instance_number: int | None
    frames: int = 1
    samples_per_pixel: int = 1
    transfer_syntax: str = ""


def _floats(value: object, count: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return array if array.shape == (count,) and np.all(np.isfinite(array)) else None


def read_header(path: Path, redactor: Redactor) -> SliceHeader | None:
    """Header of one file, or None when it is not DICOM (such files are skipped)."""
    try:
        dataset = pydicom.dcmread(path, defer_size=4096)  # large values (pixels) stay on disk
    except (InvalidDicomError, EOFError):
        return None
    except Exception as error:  # noqa: BLE001 - pydicom raises many types on corrupt files
        raise CTInputError(f"{path.name}: unreadable DICOM header ({type(error).__name__}); "
                           "re-export the series from the PACS") from None
    redactor.collect(dataset)
    spacing = _floats(dataset.get("PixelSpacing", None) or [], 2)
    number = dataset.get("InstanceNumber", None)
    ts = dataset.file_meta.get("TransferSyntaxUID", "") if hasattr(dataset, "file_meta") else ""
    return SliceHeader(
        path=path,
        series_uid=str(dataset.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)"),
        modality=str(dataset.get("Modality", "") or "").upper(),
        image_type=tuple(str(v).upper() for v in (dataset.get("ImageType", None) or [])),
        series_description=str(dataset.get("SeriesDescription", "") or ""),
        rows=int(dataset.get("Rows", 0) or 0),
        columns=int(dataset.get("Columns", 0) or 0),
        has_pixels=any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        orientation=_floats(dataset.get("ImageOrientationPatient", None) or [], 6),
        position=_floats(dataset.get("ImagePositionPatient", None) or [], 3),
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        instance_number=int(number) if number not in (None, "") else None,
        frames=int(dataset.get("NumberOfFrames", 1) or 1),
        samples_per_pixel=int(dataset.get("SamplesPerPixel", 1) or 1),
        transfer_syntax=str(ts),
    )


def list_files(folder: Path) -> list[Path]:
    """Regular files under ``folder``; a symlink pointing outside the folder is refused."""
    root = folder.resolve()
    files: list[Path] = []
    for directory, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames + filenames:
            entry = Path(directory) / name
            if entry.is_symlink():
                target = entry.resolve()
                if not target.is_relative_to(root):
                    relative = entry.relative_to(folder)
                    raise CTInputError(f"{folder.name}: {relative} is a symbolic link pointing outside the "
                                       "uploaded folder; remove it and upload the files themselves")
        for name in filenames:
            entry = Path(directory) / name
            if entry.is_file():
                files.append(entry)
        if len(files) > MAX_FILES:
            raise CTInputError(f"{folder.name}: more than {MAX_FILES} files; upload one series at a time")
    return sorted(files)


# -------------------------------------------------------------------------------------- series choice


@dataclass
class SeriesChoice:
    """The series to load, its usable slices in order, and what else was found."""

    series_uid: str
    headers: list[SliceHeader]  # sorted along the slice normal
    offsets_mm: np.ndarray  # (n,) positions along the normal relative to the first slice
    normal: np.ndarray  # (3,) LPS
    other_series: list[dict] = field(default_factory=list)
    dropped_localizers: int = 0
    dropped_duplicates: int = 0
    skipped_files: int = 0
    warnings: list[str] = field(default_factory=list)


def _summary(uid: str, headers: list[SliceHeader]) -> dict:
    return {
        "series_uid": uid,
        "modality": headers[0].modality or "unknown",
        "description": headers[0].series_description,
        "files": len(headers),
    }


def drop_localizers(headers: list[SliceHeader]) -> tuple[list[SliceHeader], int]:
    """Remove LOCALIZER images and slices whose orientation or matrix differs from the majority."""
    kept = [h for h in headers if "LOCALIZER" not in h.image_type and h.has_pixels]
    oriented = [h for h in kept if h.orientation is not None]
    if oriented:
        keys = Counter(tuple(np.round(h.orientation, 3)) for h in oriented)
        majority = np.asarray(keys.most_common(1)[0][0])
        kept = [h for h in kept if h.orientation is not None and np.allclose(h.orientation, majority, atol=1e-3)]
    sizes = Counter((h.rows, h.columns) for h in kept)
    if sizes:
        size = sizes.most_common(1)[0][0]
        kept = [h for h in kept if (h.rows, h.columns) == size]
    return kept, len(headers) - len(kept)


def choose_series(headers: list[SliceHeader], source: str, series_uid: str | None,
                  redactor: Redactor) -> SeriesChoice:
    """Group by SeriesInstanceUID and pick the requested or the largest CT series."""
    groups: dict[str, list[SliceHeader]] = {}
    for header in headers:
        groups.setdefault(header.series_uid, []).append(header)
    summaries = [_summary(uid, group) for uid, group in groups.items()]
    if series_uid is not None:
        if series_uid not in groups:
            found = ", ".join(f"{s['series_uid']} ({s['modality']}, {s['files']} files)" for s in summaries)
            raise redactor.error(f"{source}: no series with SeriesInstanceUID {series_uid!r}; found: {found}")
        chosen_uid = series_uid
    else:
        chosen_uid = _largest_ct_series(groups, source, summaries, redactor)
    chosen = groups[chosen_uid]
    modality = chosen[0].modality
    if modality != "CT":
        raise redactor.error(f"{source}: series {chosen_uid} is {modality or 'of unknown modality'}, not CT; "
                             "this tool reads CT studies only")
    if not any(h.has_pixels for h in chosen):
        raise redactor.error(f"{source}: series {chosen_uid} has no pixel data (missing PixelData); "
                             "export the images, not only their headers")
    usable, dropped = drop_localizers(chosen)
    choice = _sort_series(chosen_uid, usable, source, redactor)
    choice.other_series = [s for s in summaries if s["series_uid"] != chosen_uid]
    choice.dropped_localizers = dropped
    return choice


def _largest_ct_series(groups: dict[str, list[SliceHeader]], source: str, summaries: list[dict],
                       redactor: Redactor) -> str:
    ct_groups = {uid: g for uid, g in groups.items() if g[0].modality == "CT" and any(h.has_pixels for h in g)}
    if not ct_groups:
        found = ", ".join(f"{s['modality']} ({s['files']} files)" for s in summaries)
        if any(g[0].modality == "CT" for g in groups.values()):
            raise redactor.error(f"{source}: the CT series has no pixel data (missing PixelData); "
                                 "export the images, not only their headers")
        raise redactor.error(f"{source}: no CT image series found (found: {found}); this tool reads CT "
                             "studies only: upload a CT series")
    return max(ct_groups, key=lambda uid: sum(1 for h in ct_groups[uid] if "LOCALIZER" not in h.image_type))


def _sort_series(uid: str, headers: list[SliceHeader], source: str, redactor: Redactor) -> SeriesChoice:
    if len(headers) < 2:
        raise redactor.error(f"{source}: series {uid} has {len(headers)} usable slice(s); a CT study needs "
                             "at least 2 axial slices; upload the whole series, not a single image")
    if any(h.frames > 1 for h in headers):
        raise redactor.error(f"{source}: series {uid} is a multi-frame (enhanced) DICOM; export it as "
                             "single-frame slices or as NIfTI")
    if any(h.orientation is None or h.position is None or h.pixel_spacing is None for h in headers):
        raise redactor.error(f"{source}: series {uid} lacks ImagePositionPatient / ImageOrientationPatient / "
                             "PixelSpacing, so slices cannot be placed in space; export with geometry")
    row, col = headers[0].orientation[:3], headers[0].orientation[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise redactor.error(f"{source}: series {uid} has invalid ImageOrientationPatient (not orthonormal)")
    projections = np.asarray([float(h.position @ normal) for h in headers])
    order = np.argsort(projections, kind="stable")
    headers = [headers[i] for i in order]
    projections = projections[order]
    keep = np.concatenate([[True], np.diff(projections) > 1e-3])
    dropped = int((~keep).sum())
    headers = [h for h, k in zip(headers, keep) if k]
    projections = projections[keep]
    if len(headers) < 2:
        raise redactor.error(f"{source}: series {uid} has all slices at one position; upload a 3D series")
    choice = SeriesChoice(uid, headers, projections - projections[0], normal, dropped_duplicates=dropped)
    steps = np.diff(choice.offsets_mm)
    median = float(np.median(steps))
    if float(steps.max() - steps.min()) > max(0.01 * median, 0.01):
        choice.warnings.append(f"uneven slice spacing: {steps.min():.3g}-{steps.max():.3g} mm (median "
                               f"{median:.3g} mm); slices are resampled on their real positions")
    if dropped:
        choice.warnings.append(f"{dropped} duplicate slice position(s) dropped")
    return choice


# -------------------------------------------------------------------------------------------- pixels


def _check_decoder(header: SliceHeader, source: str, redactor: Redactor) -> None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(header.transfer_syntax)
    except NotImplementedError:
        raise redactor.error(f"{source}: transfer syntax {header.transfer_syntax} has no decoder in pydicom; "
                             "re-export the series uncompressed or as JPEG / JPEG-LS / JPEG 2000") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise redactor.error(f"{source}: compressed series (transfer syntax {header.transfer_syntax}) needs a "
                             f"decoder that is not installed ({missing}); install the optional extra "
                             "'pip install longllava-suite[dicom-codecs]' (pylibjpeg + plugins)")


def _needs_decoder(syntax: str) -> bool:
    try:
        return bool(pydicom.uid.UID(syntax).is_compressed)
    except ValueError:  # not a known transfer syntax (private UID): let the decoder lookup say so
        return True


def read_pixels(choice: SeriesChoice, source: str, redactor: Redactor,
                max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """HU volume (n_slices, rows, columns) float32 in the sorted slice order; slope/intercept per slice."""
    first = choice.headers[0]
    voxels = len(choice.headers) * first.rows * first.columns
    if voxels > max_voxels or first.rows <= 0 or first.columns <= 0:
        raise redactor.error(f"{source}: series declares {len(choice.headers)} x {first.rows} x {first.columns} "
                             f"voxels (limit {max_voxels:,}); refused before reading")
    if first.samples_per_pixel != 1:
        raise redactor.error(f"{source}: series {choice.series_uid} has {first.samples_per_pixel} samples per "
                             "pixel (colour); CT slices are greyscale")
    for syntax in {h.transfer_syntax for h in choice.headers if h.transfer_syntax}:
        if _needs_decoder(syntax):
            _check_decoder(next(h for h in choice.headers if h.transfer_syntax == syntax), source, redactor)
    volume = np.empty((len(choice.headers), first.rows, first.columns), dtype=np.float32)
    for index, header in enumerate(choice.headers):
        _read_slice(header, volume[index], source, redactor)
    return volume


def _read_slice(header: SliceHeader, out: np.ndarray, source: str, redactor: Redactor) -> None:
    try:
        dataset = pydicom.dcmread(header.path)
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - decoders raise many types
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise redactor.error(f"{source}: cannot decode the pixels of {header.path.name} (transfer syntax "
                             f"{header.transfer_syntax or 'unknown'}): {detail}; install the optional "
                             "'dicom-codecs' extra or re-export the series uncompressed") from None
    if pixels.shape != out.shape:
        raise redactor.error(f"{source}: {header.path.name} has pixels of shape {pixels.shape}, expected "
                             f"{out.shape}")
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise redactor.error(f"{source}: {header.path.name} has an invalid RescaleSlope/Intercept "
                             f"({slope}, {intercept})")
    np.multiply(pixels, np.float32(slope), out=out, casting="unsafe")
    if intercept:
        out += np.float32(intercept)


def series_affine_lps(choice: SeriesChoice) -> np.ndarray:
    """4x4 affine from voxel (column i, row j, slice k) to LPS mm for the sorted series."""
    first = choice.headers[0]
    row_cosines, column_cosines = first.orientation[:3], first.orientation[3:]
    row_spacing, column_spacing = first.pixel_spacing
    n = len(choice.headers)
    slice_step = (choice.headers[-1].position - first.position) / (n - 1)
    affine = np.eye(4)
    affine[:3, 0] = row_cosines * column_spacing  # i: along a row, to the next column
    affine[:3, 1] = column_cosines * row_spacing  # j: down a column, to the next row
    affine[:3, 2] = slice_step
    affine[:3, 3] = first.position
    return affine
