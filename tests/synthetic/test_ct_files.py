"""CT writers: DICOM series round-trip (pydicom and the project's load_ct), NIfTI geometry, privacy hooks."""

from __future__ import annotations

import importlib.util
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from domain_data.synthetic.ct_phantom import (
    make_ct_phantom,
    phantom_hu,
    write_dicom_series,
    write_nifti,
    write_volume_nifti,
)
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
    again = write_dicom_series(small, tmp_path / f"{syntax}_again", transfer_syntax=syntax)
    assert series.paths[0].read_bytes() == again.paths[0].read_bytes()  # seeded UIDs survive compression


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


def test_explicit_instance_numbers_modality_and_image_type(tmp_path):
    hu = phantom_hu(4, 10, 12, seed=1)
    numbers = [40, 10, 30, 20]
    series = write_ct_series(
        hu, (2.0, 1.0, 1.0), tmp_path / "s", instance_numbers=numbers, modality="MR",
        image_type=("DERIVED", "SECONDARY", "LOCALIZER"),
    )
    assert series.instance_numbers == numbers
    written = [pydicom.dcmread(p) for p in series.paths]
    assert [int(ds.InstanceNumber) for ds in written] == numbers
    assert {ds.Modality for ds in written} == {"MR"}
    assert {tuple(ds.ImageType) for ds in written} == {("DERIVED", "SECONDARY", "LOCALIZER")}
    default = pydicom.dcmread(write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "d").paths[0])
    assert default.Modality == "CT" and list(default.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    with pytest.raises(SyntheticDataError, match="not both"):
        write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "x", instance_numbers=numbers, wrong_instance_numbers=True)
    with pytest.raises(SyntheticDataError, match="instance_numbers needs 4 values"):
        write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "y", instance_numbers=[1, 2])


def test_localizer_takes_the_series_modality(tmp_path):
    series = write_ct_series(phantom_hu(3, 8, 8), (2.0, 1.0, 1.0), tmp_path / "s", modality="MR", add_localizer=True)
    localizer = pydicom.dcmread(series.localizer)
    assert localizer.Modality == "MR" and localizer.ImageType[2] == "LOCALIZER"


def test_one_series_written_in_parts_with_explicit_series_uid(tmp_path):
    hu = phantom_hu(6, 8, 10, seed=2)
    parts = [
        write_ct_series(
            hu[k : k + 3], (2.0, 1.0, 1.0), tmp_path / "s", series_uid="1.2.826.0.1.99", uid_seed=f"part{k}",
            file_prefix=f"P{k}_", origin=(0.0, 0.0, 2.0 * k),
        )
        for k in (0, 3)
    ]
    assert [p.series_uid for p in parts] == ["1.2.826.0.1.99"] * 2
    datasets = [pydicom.dcmread(p) for part in parts for p in part.paths]
    assert {ds.SeriesInstanceUID for ds in datasets} == {"1.2.826.0.1.99"}
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    read, offsets = read_series_hu(tmp_path / "s", series_uid="1.2.826.0.1.99")
    np.testing.assert_allclose(read, hu, atol=0.5)
    np.testing.assert_allclose(offsets, np.arange(6) * 2.0, atol=1e-4)
    default_uid = write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "d").series_uid
    assert default_uid == write_ct_series(hu, (2.0, 1.0, 1.0), tmp_path / "e").series_uid != "1.2.826.0.1.99"


def test_phantom_hu_is_seeded_and_shows_orientation():
    hu = phantom_hu(5, 30, 40, seed=3)
    assert hu.shape == (5, 30, 40) and hu.dtype == np.float32
    np.testing.assert_array_equal(hu, phantom_hu(5, 30, 40, seed=3))
    assert not np.array_equal(hu, phantom_hu(5, 30, 40, seed=4))
    offsets = hu[:, 0, 0] + 1000.0  # air corner: the per-slice offset
    assert np.ptp(offsets) > 0 and not np.allclose(offsets, np.round(offsets))
    plane = hu[0] - offsets[0]
    marker_y, marker_x = np.argwhere(plane > 1000).mean(axis=0)
    assert marker_x > 20 and marker_y < 15  # patient's left (x up), anterior (y down)
    assert not np.array_equal(plane, plane[:, ::-1]) and not np.array_equal(plane, plane[::-1])


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "I"), ("A", "R", "S"), ("S", "L", "P")])
def test_volume_nifti_axcodes_store_the_same_image(tmp_path, axcodes):
    hu = phantom_hu(6, 9, 7, seed=1).round()
    spacing = (2.5, 0.9, 0.8)
    reference = nib.load(write_volume_nifti(hu, spacing, tmp_path / "lps.nii"))
    image = nib.load(write_volume_nifti(hu, spacing, tmp_path / "v.nii.gz", axcodes=axcodes))
    assert nib.aff2axcodes(image.affine) == axcodes
    stored, lps = np.asarray(image.dataobj), np.asarray(reference.dataobj)
    assert stored.shape != lps.shape or not np.array_equal(stored, lps)  # the voxels really were rearranged
    canonical, expected = nib.as_closest_canonical(image), nib.as_closest_canonical(reference)
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), np.asarray(expected.dataobj))
    np.testing.assert_allclose(canonical.affine, expected.affine, atol=1e-6)
    assert canonical.header.get_zooms() == pytest.approx(expected.header.get_zooms())
    with pytest.raises(SyntheticDataError, match="axcodes"):
        write_volume_nifti(hu, spacing, tmp_path / "bad.nii", axcodes=("L", "R", "S"))
    with pytest.raises(SyntheticDataError, match="not both"):
        write_volume_nifti(hu, spacing, tmp_path / "bad.nii", axcodes=axcodes, flip_x=True)


def test_volume_nifti_float_dtype_is_not_rounded(tmp_path):
    hu = phantom_hu(3, 6, 5, seed=0)
    hu[1, 2, 3], hu[2, 0, 0] = np.nan, np.inf
    image = nib.load(write_volume_nifti(hu, (2.0, 1.0, 1.0), tmp_path / "f.nii.gz", dtype="float32"))
    stored = np.asarray(image.dataobj).transpose(2, 1, 0)
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, hu)  # NaN == NaN here; the non-integer offsets survive
    rounded = np.asarray(nib.load(write_volume_nifti(hu[:1], (2.0, 1.0, 1.0), tmp_path / "i.nii")).dataobj)
    np.testing.assert_array_equal(rounded.transpose(2, 1, 0), np.round(hu[:1]))


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
