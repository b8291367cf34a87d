"""Bad-input corpus: every case raises CTInputError with a clear one-line message, writes nothing
outside a temporary folder (the upload folder is unchanged, tempfile's folder is left empty, and no
file appears next to the upload)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000, generate_uid

from domain_data.medical.ct import load_ct
from domain_data.medical.errors import CTInputError
from domain_data.synthetic.ct_phantom import phantom_hu, write_volume_nifti
from domain_data.synthetic.dicom_writer import write_ct_series
from longllava.errors import UserInputError

SPACING = (2.0, 0.7, 0.7)  # (z, y, x) mm


def _series(folder: Path, n: int = 4, spacing: tuple[float, float, float] = SPACING, **kwargs: object) -> list[Path]:
    return write_ct_series(phantom_hu(n, 16, 16), spacing, folder, **kwargs).paths


def empty_file(upload: Path) -> Path:
    (upload / "scan.nii.gz").write_bytes(b"")
    return upload / "scan.nii.gz"


def truncated_nifti(upload: Path) -> Path:
    path = write_volume_nifti(phantom_hu(20, 64, 64), SPACING, upload / "whole.nii.gz", dtype="float32")
    data = path.read_bytes()
    path.unlink()
    (upload / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return upload / "cut.nii.gz"


def zip_path_traversal(upload: Path) -> Path:
    with zipfile.ZipFile(upload / "evil.zip", "w") as archive:
        archive.writestr("ok.dcm", b"x")
        archive.writestr("../../evil.dcm", b"owned")
    return upload / "evil.zip"


def zip_absolute_name(upload: Path) -> Path:
    with zipfile.ZipFile(upload / "abs.zip", "w") as archive:
        archive.writestr("/tmp/evil_abs.dcm", b"owned")
    return upload / "abs.zip"


def zip_bomb(upload: Path) -> Path:
    with zipfile.ZipFile(upload / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", b"\0" * (20 * 1024 * 1024))  # 20 MiB of zeros -> ~20 KiB
    return upload / "bomb.zip"


def zip_nested(upload: Path) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("a.dcm", b"x")
    with zipfile.ZipFile(upload / "outer.zip", "w") as archive:
        archive.writestr("inner.zip", inner.getvalue())
    return upload / "outer.zip"


def zip_nested_renamed(upload: Path) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("a.dcm", b"x")
    with zipfile.ZipFile(upload / "outer2.zip", "w") as archive:
        archive.writestr("looks_like.dcm", inner.getvalue())
    return upload / "outer2.zip"


def zip_symlink_entry(upload: Path) -> Path:
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(upload / "link.zip", "w") as archive:
        archive.writestr(info, "/etc/passwd")
    return upload / "link.zip"


def zip_corrupt_entry(upload: Path) -> Path:
    with zipfile.ZipFile(upload / "corrupt.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("slice.dcm", bytes(range(256)) * 64)
    data = bytearray((upload / "corrupt.zip").read_bytes())
    start = 30 + len("slice.dcm")  # local header, name, then the deflated bytes
    data[start + 5 : start + 40] = b"\xff" * 35
    (upload / "corrupt.zip").write_bytes(bytes(data))
    return upload / "corrupt.zip"


def not_a_zip(upload: Path) -> Path:
    (upload / "study.zip").write_bytes(b"this is not an archive at all" * 10)
    return upload / "study.zip"


def non_image_dicom(upload: Path) -> Path:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    for k in range(2):
        dataset = pydicom.dataset.FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.Modality = "SR"
        dataset.SeriesInstanceUID = "1.2.3.4"
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(upload / f"report{k}.dcm", enforce_file_format=True)
    return upload


def mr_instead_of_ct(upload: Path) -> Path:
    _series(upload / "mr", modality="MR")
    return upload / "mr"


def single_slice(upload: Path) -> Path:
    (upload / "one").mkdir()
    (upload / "one" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    return upload / "one"


def missing_pixel_data(upload: Path) -> Path:
    for path in _series(upload / "nopix"):
        dataset = pydicom.dcmread(path)
        del dataset.PixelData
        dataset.save_as(path)
    return upload / "nopix"


def unsupported_compression_without_plugin(upload: Path) -> Path:
    folder = upload / "j2k"
    folder.mkdir()
    for k in range(2):
        dataset = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))
        dataset.SOPInstanceUID = generate_uid()
        dataset.ImagePositionPatient = [-122.5, -112.4, 47.0 + 5 * k]
        dataset.save_as(folder / f"{k}.dcm")
    return folder


def undecodable_jpeg(upload: Path) -> Path:
    folder = upload / "lossy"
    folder.mkdir()
    for k in range(2):  # 12-bit extended JPEG that no installed plugin decodes
        dataset = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
        dataset.Modality = "CT"
        dataset.SeriesInstanceUID = "1.2.3.5"
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0, 0, 3.0 * k]
        dataset.save_as(folder / f"{k}.dcm")
    return folder


def colour_images(upload: Path) -> Path:
    folder = upload / "rgb"
    folder.mkdir()
    for k in range(2):  # an RGB secondary capture relabelled CT with geometry
        dataset = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
        dataset.Modality, dataset.SeriesInstanceUID = "CT", "1.2.3.8"
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0, 0, 2.0 * k]
        dataset.save_as(folder / f"{k}.dcm")
    return folder


def private_transfer_syntax(upload: Path) -> Path:
    for path in _series(upload / "private"):
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
        dataset.save_as(path)
    return upload / "private"


def nan_voxels(upload: Path) -> Path:
    hu = phantom_hu(6, 16, 16)
    hu[2, 3, 4], hu[4, 5, 6] = np.nan, np.inf
    return write_volume_nifti(hu, SPACING, upload / "nan.nii.gz", dtype="float32")  # float keeps NaN/inf


def huge_nifti_dimensions(upload: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 2000))
    header.set_data_dtype(np.int16)
    with gzip.open(upload / "huge.nii.gz", "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + b"\0" * 1000)  # header + extension flag + a few bytes
    return upload / "huge.nii.gz"


def huge_dicom_dimensions(upload: Path) -> Path:
    for path in _series(upload / "huge"):
        dataset = pydicom.dcmread(path)
        dataset.Rows = dataset.Columns = 65535
        dataset.save_as(path)
    return upload / "huge"


def wrong_extension_png(upload: Path) -> Path:
    from PIL import Image

    Image.new("L", (8, 8)).save(upload / "scan.png")
    return upload / "scan.png"


def dicom_named_nii(upload: Path) -> Path:
    (upload / "scan.nii").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    return upload / "scan.nii"


def folder_without_dicom(upload: Path) -> Path:
    (upload / "docs").mkdir()
    (upload / "docs" / "notes.txt").write_text("hello")
    (upload / "docs" / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return upload / "docs"


def empty_folder(upload: Path) -> Path:
    (upload / "nothing").mkdir()
    return upload / "nothing"


def symlink_outside_upload(upload: Path) -> Path:
    folder = upload / "series"
    _series(folder)
    outside = upload.parent / "outside_secret.dcm"
    outside.write_bytes(b"secret")
    os.symlink(outside, folder / "link.dcm")
    return folder


def degenerate_affine(upload: Path) -> Path:
    path = write_volume_nifti(phantom_hu(4, 8, 8), SPACING, upload / "flat.nii", dtype="float32")
    data = bytearray(path.read_bytes())
    data[252:256] = np.array([0, 1], dtype="<i2").tobytes()  # qform_code 0, sform_code 1
    data[296:312] = np.zeros(4, dtype="<f4").tobytes()  # srow_y = 0: the y axis has no size
    path.write_bytes(bytes(data))
    return path


def zero_pixel_spacing(upload: Path) -> Path:
    _series(upload / "zero", spacing=(2.0, 0.0, 0.0))
    return upload / "zero"


def four_d_nifti(upload: Path) -> Path:
    from nibabel.testing import data_path

    (upload / "4d.nii.gz").write_bytes((Path(data_path) / "example4d.nii.gz").read_bytes())
    return upload / "4d.nii.gz"


def missing_geometry(upload: Path) -> Path:
    for path in _series(upload / "nogeo"):
        dataset = pydicom.dcmread(path)
        del dataset.ImagePositionPatient
        dataset.save_as(path)
    return upload / "nogeo"


def missing_path(upload: Path) -> Path:
    return upload / "does_not_exist"


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty file": (empty_file, "empty"),
    "truncated .nii.gz": (truncated_nifti, "truncated or corrupt|unreadable NIfTI"),
    "zip path traversal": (zip_path_traversal, "path traversal"),
    "zip absolute name": (zip_absolute_name, "path traversal"),
    "zip bomb": (zip_bomb, "zip bomb"),
    "nested zip": (zip_nested, "nested archives"),
    "nested zip renamed .dcm": (zip_nested_renamed, "nested archives"),
    "zip symlink entry": (zip_symlink_entry, "symbolic link"),
    "not a zip": (not_a_zip, "not a zip archive"),
    "corrupt zip entry": (zip_corrupt_entry, "cannot be extracted"),
    "non-image DICOM": (non_image_dicom, "no CT image series found"),
    "MR instead of CT": (mr_instead_of_ct, r"no CT image series found \(found: MR \(4 files\)\)"),
    "single slice": (single_slice, "1 usable slice"),
    "missing pixel data": (missing_pixel_data, "no pixel data"),
    "compression without plugin": (unsupported_compression_without_plugin, "decoder that is not installed"),
    "undecodable JPEG": (undecodable_jpeg, "cannot decode the pixels"),
    "NaN/inf voxels": (nan_voxels, "NaN or infinite"),
    "colour images": (colour_images, "3 samples per pixel"),
    "private transfer syntax": (private_transfer_syntax, "transfer syntax 1.2.3.4.5.6.7 has no decoder in pydicom"),
    "huge NIfTI dimensions": (huge_nifti_dimensions, "refused before reading"),
    "huge DICOM dimensions": (huge_dicom_dimensions, "refused before reading"),
    "wrong extension": (wrong_extension_png, "unsupported file type '.png'"),
    "DICOM named .nii": (dicom_named_nii, "named .nii but the content is a DICOM file"),
    "folder without DICOM": (folder_without_dicom, "none of the 2 file"),
    "empty folder": (empty_folder, "no files found"),
    "symlink outside upload": (symlink_outside_upload, "symbolic link pointing outside"),
    "4D NIfTI": (four_d_nifti, "one 3D volume"),
    "degenerate NIfTI affine": (degenerate_affine, "degenerate voxel-to-world affine"),
    "zero pixel spacing": (zero_pixel_spacing, "degenerate voxel-to-world affine"),
    "missing geometry": (missing_geometry, "lacks ImagePositionPatient"),
    "missing path": (missing_path, "no such file"),
}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def no_j2k_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine without the JPEG 2000 decoders (pylibjpeg-openjpeg, Pillow's OpenJPEG)."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEG2000)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-openjpeg",)})


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, tmp_path: Path, scratch_tempdir: Path, monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> None:
    build, expected = CASES[case]
    upload = tmp_path / "upload"
    upload.mkdir()
    path = build(upload)
    if case == "compression without plugin":
        request.getfixturevalue("no_j2k_plugin")
    before = _tree(upload)
    neighbours = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CTInputError, match=expected) as caught:
        load_ct(path)
    message = str(caught.value)
    assert isinstance(caught.value, UserInputError)
    assert "\n" not in message and "Traceback" not in message
    assert _tree(upload) == before, "the upload folder was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == neighbours, "a file appeared next to the upload"
    assert list(scratch_tempdir.iterdir()) == [], "temporary files were left behind"
    assert not Path("/tmp/evil_abs.dcm").exists()
