"""DICOM series: real pydicom test files (plain, JPEG 2000, JPEG-LS) and seeded synthetic series."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from domain_data.medical.ct import load_ct
from domain_data.medical.errors import CTInputError
from domain_data.synthetic.ct_phantom import phantom_hu
from domain_data.synthetic.dicom_writer import write_ct_series

SPACING = (2.0, 0.7, 0.7)  # (z, y, x) mm


def _marked_phantom(n: int, rows: int = 48, cols: int = 40, seed: int = 0) -> np.ndarray:
    """Phantom whose top-left 3x3 corner holds 10 * slice index (HU) so order is visible."""
    hu = phantom_hu(n, rows, cols, seed=seed)
    hu[:, :3, :3] = (np.arange(n) * 10.0)[:, None, None]
    return hu


# ------------------------------------------------------------------------------ real pydicom files


def test_ct_small_copies_sorted_by_position_with_real_pixels(copy_series, tmp_path: Path) -> None:
    def add_index(dataset: pydicom.Dataset, k: int) -> None:
        dataset.PixelData = (dataset.pixel_array + k * 7).astype(dataset.pixel_array.dtype).tobytes()

    datasets = copy_series("CT_small.dcm", tmp_path / "series", 6, spacing=1.25, edit=add_index)
    volume = load_ct(tmp_path / "series")
    assert volume.shape == (6, 128, 128)
    assert volume.spacing_mm == pytest.approx((1.25, 0.661468, 0.661468), rel=1e-5)
    for k, dataset in enumerate(datasets):  # CT_small: slope 1, intercept -1024; axial LPS already canonical
        np.testing.assert_array_equal(volume.hu[k], dataset.pixel_array.astype(np.float32) - 1024.0)
    assert volume.metadata["modality"] == "CT"
    assert volume.metadata["slice_count"] == 6
    assert volume.metadata["original_orientation"] == "LPS"


def test_jpeg2000_ct_series_decodes(copy_series, tmp_path: Path) -> None:
    datasets = copy_series("693_J2KI.dcm", tmp_path / "j2k", 3, spacing=5.0)
    volume = load_ct(tmp_path / "j2k")
    expected = datasets[0].pixel_array.astype(np.float32) * float(datasets[0].RescaleSlope) + float(
        datasets[0].RescaleIntercept)
    assert volume.shape == (3, 512, 512)
    np.testing.assert_array_equal(volume.hu[1], expected)
    assert volume.metadata["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.91"]


@pytest.mark.parametrize("compressed", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                        "MR_small_RLE.dcm"])
def test_lossless_compressed_series_equal_uncompressed(copy_series, tmp_path: Path, compressed: str) -> None:
    """JPEG-LS / JPEG 2000 / RLE lossless copies of MR_small decode to the uncompressed pixels (relabelled CT)."""
    copy_series(compressed, tmp_path / "c", 3, modality="CT")
    copy_series("MR_small.dcm", tmp_path / "u", 3, modality="CT")
    decoded, plain = load_ct(tmp_path / "c"), load_ct(tmp_path / "u")
    assert decoded.shape == plain.shape == (3, 64, 64)
    np.testing.assert_array_equal(decoded.hu, plain.hu)


def test_extended_jpeg_series_decodes(copy_series, tmp_path: Path, testdata) -> None:
    """JPGExtended.dcm (12-bit extended JPEG, pylibjpeg-libjpeg) given CT geometry."""
    folder = tmp_path / "jpeg"
    folder.mkdir()
    expected = pydicom.dcmread(testdata("JPGExtended.dcm")).pixel_array.astype(np.float32)
    for k in range(2):
        dataset = pydicom.dcmread(testdata("JPGExtended.dcm"))
        dataset.Modality, dataset.SeriesInstanceUID = "CT", "1.2.3.7"
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0, 0, 4.0 * k]
        dataset.save_as(folder / f"{k}.dcm")
    volume = load_ct(folder)
    assert volume.shape == (2, 1024, 256) and volume.metadata["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.51"]
    np.testing.assert_array_equal(volume.hu[0], expected)  # no slope/intercept in the file: 1 / 0


def test_zip_of_series_loads_like_folder_and_cleans_up(copy_series, tmp_path: Path, scratch_tempdir: Path) -> None:
    copy_series("CT_small.dcm", tmp_path / "series", 4)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted((tmp_path / "series").iterdir()):
            handle.write(path, f"DICOM/sub/{path.name}")
        handle.writestr("README.txt", "not dicom")
    from_zip, from_folder = load_ct(archive), load_ct(tmp_path / "series")
    np.testing.assert_array_equal(from_zip.hu, from_folder.hu)
    assert from_zip.metadata["source_kind"] == "dicom_zip"
    assert from_zip.metadata["skipped_non_dicom_files"] == 1
    assert list(scratch_tempdir.iterdir()) == []


# ---------------------------------------------------------------------------------------- synthetic


def test_shuffled_files_and_wrong_instance_numbers(tmp_path: Path) -> None:
    hu = _marked_phantom(12)
    wrong_numbers = [12 - k for k in range(12)]  # reversed: sorting by it would flip the volume
    series = write_ct_series(hu, SPACING, tmp_path / "s", shuffle_files=True, seed=5, instance_numbers=wrong_numbers)
    assert [p.name for p in series.paths] != sorted(p.name for p in series.paths)  # file names shuffled
    assert [int(pydicom.dcmread(p).InstanceNumber) for p in series.paths] == wrong_numbers
    volume = load_ct(tmp_path / "s")
    np.testing.assert_allclose(volume.hu[:, 0, 0], np.arange(12) * 10.0, atol=0.5)
    np.testing.assert_allclose(volume.hu, hu, atol=0.5)


def test_positions_descending_still_inferior_to_superior(tmp_path: Path) -> None:
    hu = _marked_phantom(10)
    write_ct_series(hu, SPACING, tmp_path / "s", slice_offsets_mm=list(np.arange(10)[::-1] * -3.0 + 27.0))
    volume = load_ct(tmp_path / "s")
    np.testing.assert_allclose(volume.hu[:, 0, 0], np.arange(10) * 10.0, atol=0.5)
    assert volume.spacing_mm[0] == pytest.approx(3.0)


def test_mixed_series_picks_largest_ct_and_reports_others(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_ct_series(_marked_phantom(14), SPACING, folder, series_uid="1.2.3.14", uid_seed="a", file_prefix="a",
                    series_description="BIG")
    write_ct_series(_marked_phantom(6, seed=1) + 100, SPACING, folder, series_uid="1.2.3.6", uid_seed="b",
                    file_prefix="b", series_description="SMALL")
    write_ct_series(_marked_phantom(20), SPACING, folder, series_uid="1.2.3.20", uid_seed="c", file_prefix="c",
                    modality="MR", series_description="MR")
    volume = load_ct(folder)
    assert volume.metadata["series_uid"] == "1.2.3.14" and volume.num_slices == 14
    others = {s["series_uid"]: s for s in volume.metadata["other_series"]}
    assert others["1.2.3.6"]["files"] == 6 and others["1.2.3.20"]["modality"] == "MR"
    chosen = load_ct(folder, series_uid="1.2.3.6")
    assert chosen.num_slices == 6 and chosen.metadata["series_description"] == "SMALL"
    with pytest.raises(CTInputError, match="no series with SeriesInstanceUID '9.9'"):
        load_ct(folder, series_uid="9.9")


def test_localizers_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    write_ct_series(_marked_phantom(8), SPACING, folder, series_uid="1.2.3")
    write_ct_series(phantom_hu(1, 48, 40), SPACING, folder, series_uid="1.2.3", uid_seed="loc", file_prefix="loc",
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), origin=(0.0, 0.0, 500.0))
    write_ct_series(phantom_hu(1, 48, 40), SPACING, folder, series_uid="1.2.3", uid_seed="sag",  # unflagged scout
                    file_prefix="sag", orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    volume = load_ct(folder)
    assert volume.num_slices == 8
    assert volume.metadata["dropped_localizers"] == 2
    np.testing.assert_allclose(volume.hu[:, 0, 0], np.arange(8) * 10.0, atol=0.5)


def test_slope_intercept_per_slice(tmp_path: Path) -> None:
    hu = _marked_phantom(6)
    folder = tmp_path / "s"
    rescales = [(0.5 + k * 0.25, -1024.0 + 37 * k) for k in range(6)]  # every slice its own, same series
    series = write_ct_series(hu, SPACING, folder, rescale=rescales)
    assert [(float(d.RescaleSlope), float(d.RescaleIntercept)) for d in map(pydicom.dcmread, series.paths)] == rescales
    volume = load_ct(folder)
    for k in range(6):
        np.testing.assert_allclose(volume.hu[k], hu[k], atol=(0.5 + k * 0.25) / 2 + 1e-3)


def test_oblique_series_sorted_along_normal(tmp_path: Path) -> None:
    angle = np.deg2rad(20)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(angle), np.sin(angle))  # tilted about x, no gantry shear
    hu = _marked_phantom(9)
    write_ct_series(hu, (3.0, 0.8, 0.8), tmp_path / "s", orientation=orientation, shuffle_files=True, seed=2)
    volume = load_ct(tmp_path / "s")
    np.testing.assert_allclose(volume.hu, hu, atol=0.5)
    assert volume.spacing_mm == pytest.approx((3.0, 0.8, 0.8), rel=1e-4)
    normal_ras = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    np.testing.assert_allclose(normal_ras, [0.0, np.sin(angle), np.cos(angle)], atol=1e-4)  # LPS -> RAS


def test_coronal_acquisition_reoriented_to_axial(tmp_path: Path) -> None:
    """Coronal slices (rows run inferior) end up as z = superior after canonicalisation."""
    hu = _marked_phantom(5, rows=12, cols=10)  # acquisition: 5 coronal planes of 12 x 10
    write_ct_series(hu, (4.0, 1.0, 1.0), tmp_path / "s", orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    volume = load_ct(tmp_path / "s")
    assert volume.metadata["original_orientation"] == "LIP"  # i: Left, j: Inferior, k: row x col = Posterior
    assert volume.shape == (12, 5, 10)
    # acquisition row r runs inferior -> z = 11 - r; slice k lies k steps posterior -> y = k
    for k in range(5):
        np.testing.assert_allclose(volume.hu[::-1, k, :], hu[k], atol=0.5)
    assert volume.spacing_mm == pytest.approx((1.0, 4.0, 1.0))


def test_uneven_spacing_reported(tmp_path: Path) -> None:
    positions = [0.0, 2.0, 4.0, 6.0, 10.0, 12.0, 14.0]
    write_ct_series(_marked_phantom(7), SPACING, tmp_path / "s", slice_offsets_mm=positions)
    volume = load_ct(tmp_path / "s")
    assert volume.metadata["uneven_spacing"] and "2-4 mm" in volume.metadata["uneven_spacing"]
    np.testing.assert_allclose(volume.z_offsets_mm, positions, atol=1e-3)


def test_single_dicom_file_is_a_clear_error(testdata) -> None:
    with pytest.raises(CTInputError, match="1 usable slice"):
        load_ct(testdata("CT_small.dcm"))
