"""CT writers: DICOM series round-trip (pydicom and the project's load_ct), NIfTI geometry, privacy hooks."""

from __future__ import annotations

import importlib.util
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from domain_data.synthetic.ct_phantom import make_ct_phantom, write_dicom_series, write_nifti
from domain_data.synthetic.dicom_writer import fake_patient, read_series_hu, write_ct_series
from domain_data.synthetic.errors import SyntheticDataError

HAS_LOAD_CT = importlib.util.find_spec("domain_data.medical.ct") is not None
needs_load_ct = pytest.mark.skipif(not HAS_LOAD_CT, reason="domain_data.medical.ct (load_ct) not available")


@pytest.fixture(scope="module")
def phantom():
    return make_ct_phantom(8, findings=["Lung nodule", "Pleural effusion"], n_slices=40, size=64)


def expected_hu(phantom) -> np.ndarray:
    return np.round(phantom.hu.astype(np.float64))


def test_dicom_tags_and_pixels(phantom, tmp_path):
    series = write_dicom_series(phantom, tmp_path / "s")
    assert len(series.paths) == 40
    first, last = pydicom.dcmread(series.paths[0]), pydicom.dcmread(series.paths[-1])
    sz, sy, sx = phantom.spacing
    assert first.Modality == "CT" and first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert first.SeriesInstanceUID == last.SeriesInstanceUID == series.series_uid
    assert first.StudyInstanceUID == series.study_uid and first.SOPInstanceUID != last.SOPInstanceUID
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([sy, sx], abs=1e-4)
    assert float(first.SliceThickness) == pytest.approx(sz, abs=1e-4)
    z0, z1 = float(first.ImagePositionPatient[2]), float(last.ImagePositionPatient[2])
    assert z1 - z0 == pytest.approx(39 * sz, abs=1e-3)
    assert first.PatientName == "" and "InstitutionName" not in first
    hu = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(hu, expected_hu(phantom)[0])


def test_shuffled_files_and_wrong_instance_numbers_sort_by_position(phantom, tmp_path):
    series = write_dicom_series(
        phantom, tmp_path / "s", shuffle_files=True, wrong_instance_numbers=True, add_localizer=True, seed=4
    )
    names = [p.name for p in series.paths]
    assert names != sorted(names)  # file name order is not slice order
    assert series.instance_numbers != sorted(series.instance_numbers)
    assert pydicom.dcmread(series.localizer).ImageType[2] == "LOCALIZER"
    hu, offsets = read_series_hu(tmp_path / "s")
    np.testing.assert_array_equal(hu, expected_hu(phantom))
    assert np.allclose(np.diff(offsets), phantom.spacing[0], atol=1e-3)


def test_per_slice_rescale_and_signed_pixels(phantom, tmp_path):
    rescales = [(1.0, -1024.0) if k % 2 else (2.0, 0.0) for k in range(40)]
    write_dicom_series(phantom, tmp_path / "s", rescale=rescales)
    hu, _ = read_series_hu(tmp_path / "s")
    assert np.abs(hu - phantom.hu).max() <= 1.0 + 1e-3
    signed = [pydicom.dcmread(p).PixelRepresentation for p in sorted((tmp_path / "s").glob("*.dcm"))]
    assert set(signed) == {0, 1}  # (2, 0) needs negative stored values


def test_same_call_same_bytes_and_distinct_uid_seeds(phantom, tmp_path):
    a = write_dicom_series(phantom, tmp_path / "a")
    b = write_dicom_series(phantom, tmp_path / "b")
    c = write_dicom_series(phantom, tmp_path / "c", uid_seed="other")
    assert a.paths[5].read_bytes() == b.paths[5].read_bytes()
    assert c.series_uid != a.series_uid


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes_round_trip(tmp_path, syntax):
    small = make_ct_phantom(2, findings=[], n_slices=16, size=48)
    try:
        series = write_dicom_series(small, tmp_path / syntax, transfer_syntax=syntax)
    except SyntheticDataError as error:
        pytest.skip(f"encoder unavailable: {error}")
    assert pydicom.dcmread(series.paths[0]).file_meta.TransferSyntaxUID == series.transfer_syntax
    hu, _ = read_series_hu(tmp_path / syntax)
    np.testing.assert_array_equal(hu, expected_hu(small))


def test_fake_patient_identifiers_are_written_and_distinctive(phantom, tmp_path):
    patient = fake_patient(7)
    series = write_dicom_series(phantom, tmp_path / "s", patient=patient)
    ds = pydicom.dcmread(series.paths[0])
    assert str(ds.PatientName) == patient.name and ds.PatientID == patient.patient_id
    assert ds.AccessionNumber == patient.accession and ds.InstitutionName == patient.institution
    assert all("FAKE" in value.upper() for value in patient.identifiers() if not value.isdigit())


def test_oblique_orientation_and_uneven_spacing(tmp_path):
    hu = np.zeros((5, 8, 8), dtype=np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    offsets = [0.0, 2.0, 4.0, 7.0, 9.0]
    write_ct_series(
        hu, (2.0, 1.0, 1.0), tmp_path / "o", orientation=(c, s, 0, -s, c, 0), slice_offsets_mm=offsets
    )
    _, read_offsets = read_series_hu(tmp_path / "o")
    assert np.allclose(read_offsets - read_offsets[0], offsets, atol=1e-4)
    with pytest.raises(SyntheticDataError):
        write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "bad", orientation=(1, 0, 0, 1, 0, 0))


def test_nifti_geometry_and_scaling(phantom, tmp_path):
    path = write_nifti(phantom, tmp_path / "a.nii.gz")
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert image.header.get_zooms() == pytest.approx(phantom.spacing[::-1], abs=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), expected_hu(phantom))
    scaled = nib.load(write_nifti(phantom, tmp_path / "b.nii", rescale=(2.0, -1024.0)))
    assert scaled.dataobj.slope == 2.0 and scaled.dataobj.inter == -1024.0
    assert np.abs(scaled.get_fdata().transpose(2, 1, 0) - phantom.hu).max() <= 1.0 + 1e-3
    assert write_nifti(phantom, tmp_path / "c.nii.gz").read_bytes() == path.read_bytes()


@needs_load_ct
@pytest.mark.parametrize("flip", [False, True])
def test_load_ct_reads_nifti_in_phantom_orientation(phantom, tmp_path, flip):
    from domain_data.medical.ct import load_ct

    path = write_nifti(phantom, tmp_path / "a.nii.gz", flip_x=flip, flip_y=flip)
    volume = load_ct(path)
    np.testing.assert_array_equal(volume.hu, expected_hu(phantom))
    assert volume.spacing_mm == pytest.approx(phantom.spacing, abs=1e-4)


@needs_load_ct
def test_load_ct_reads_messy_dicom_series_like_the_nifti(phantom, tmp_path):
    from domain_data.medical.ct import load_ct

    patient = fake_patient(9)
    write_dicom_series(
        phantom,
        tmp_path / "s",
        shuffle_files=True,
        wrong_instance_numbers=True,
        add_localizer=True,
        patient=patient,
        seed=2,
    )
    volume = load_ct(tmp_path / "s")
    np.testing.assert_array_equal(volume.hu, expected_hu(phantom))
    assert volume.spacing_mm == pytest.approx(phantom.spacing, abs=1e-4)
    nifti = load_ct(write_nifti(phantom, tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-3)
    text = json.dumps(volume.metadata, default=str)
    assert not any(identifier in text for identifier in patient.identifiers())


def test_zip_series_is_reproducible(phantom, tmp_path):
    from domain_data.synthetic.dicom_writer import zip_series

    write_dicom_series(phantom, tmp_path / "s")
    a = zip_series(tmp_path / "s", tmp_path / "a.zip", arc_prefix="study/")
    b = zip_series(tmp_path / "s", tmp_path / "b.zip", arc_prefix="study/")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(SyntheticDataError):
        zip_series(tmp_path / "empty", tmp_path / "c.zip")


@needs_load_ct
def test_load_ct_reads_the_zipped_series(phantom, tmp_path):
    from domain_data.medical.ct import load_ct
    from domain_data.synthetic.dicom_writer import zip_series

    write_dicom_series(phantom, tmp_path / "s", shuffle_files=True)
    volume = load_ct(zip_series(tmp_path / "s", tmp_path / "study.zip", arc_prefix="study/"))
    np.testing.assert_array_equal(volume.hu, expected_hu(phantom))
