"""NIfTI: nibabel's example files, orientation flips/permutations, header scaling, CT-RATE rescale once."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from domain_data.medical.ct import load_ct
from domain_data.medical.errors import CTInputError
from domain_data.synthetic.ct_phantom import phantom_hu, write_volume_nifti

CT_RATE_ROW = {"RescaleSlope": "1.0", "RescaleIntercept": "-1024.0", "XYSpacing": "[0.75, 0.75]", "ZSpacing": "1.5"}


def test_nibabel_anatomical_las_is_flipped_along_y(nibabel_data: Path) -> None:
    path = nibabel_data / "anatomical.nii"
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)  # (x, y, z), axcodes L, A, S
    volume = load_ct(path)
    assert volume.shape == (25, 41, 33) and volume.metadata["original_orientation"] == "LAS"
    np.testing.assert_array_equal(volume.hu, data[:, ::-1, :].transpose(2, 1, 0))
    assert volume.spacing_mm == pytest.approx((2.0, 2.0, 2.0))


def test_nibabel_standard_ras_anisotropic_spacing(nibabel_data: Path) -> None:
    path = nibabel_data / "standard.nii.gz"
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)  # (4, 5, 7) RAS, zooms 1, 3, 2
    volume = load_ct(path)
    np.testing.assert_array_equal(volume.hu, data[::-1, ::-1, :].transpose(2, 1, 0))
    assert volume.spacing_mm == pytest.approx((2.0, 3.0, 1.0))
    # affine maps canonical voxel (x, y, z) to the same world point as the source voxel
    source = nib.load(path).affine @ np.array([3, 4, 2, 1.0])  # x flipped 3 -> 0, y flipped 4 -> 0
    np.testing.assert_allclose(volume.affine @ np.array([0, 0, 2, 1.0]), source)


@pytest.mark.parametrize("axcodes", [("L", "P", "S"), ("R", "A", "S"), ("L", "P", "I"), ("A", "R", "S"),
                                     ("S", "L", "P"), ("I", "A", "R")])
def test_orientation_flips_and_permutations_round_trip(tmp_path: Path, axcodes: tuple[str, str, str]) -> None:
    hu = phantom_hu(9, 14, 11, seed=3)
    hu[:, :2, :2] = (np.arange(9) * 10.0)[:, None, None]
    path = write_volume_nifti(hu, (2.5, 0.9, 0.8), tmp_path / "v.nii.gz", axcodes=axcodes, dtype="float32")
    volume = load_ct(path)
    assert volume.metadata["original_orientation"] == "".join(axcodes)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((2.5, 0.9, 0.8), rel=1e-5)


def test_header_scaling_applied_once(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).integers(0, 2000, size=(6, 7, 8)).astype(np.int16)
    image = nib.Nifti1Image(raw, np.diag([-1.0, -1.0, 2.0, 1.0]))  # LPS axcodes: no reorientation
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    volume = load_ct(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(volume.hu, (raw.astype(np.float32) * 2 - 1024).transpose(2, 1, 0))
    ct_rate = load_ct(tmp_path / "scaled.nii.gz", ct_rate_metadata=CT_RATE_ROW)
    np.testing.assert_array_equal(ct_rate.hu, volume.hu)  # the CSV intercept is not applied on top
    assert "header already scales" in ct_rate.metadata["ct_rate"]["rescale"]


def _ct_rate_like(tmp_path: Path, in_hu: bool) -> tuple[Path, np.ndarray]:
    hu = phantom_hu(8, 32, 32, seed=1).round()
    stored = hu if in_hu else hu + 1024.0  # original release: raw stored values; v2: HU
    image = nib.Nifti1Image(stored.transpose(2, 1, 0).astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
    path = tmp_path / ("v2.nii.gz" if in_hu else "raw.nii.gz")
    nib.save(image, path)
    return path, hu


def test_ct_rate_raw_volume_rescaled_with_csv_spacing(tmp_path: Path) -> None:
    path, hu = _ct_rate_like(tmp_path, in_hu=False)
    volume = load_ct(path, ct_rate_metadata=CT_RATE_ROW)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((1.5, 0.75, 0.75))
    assert volume.metadata["ct_rate"]["rescale"] == "applied from the metadata CSV"
    assert volume.metadata["source_kind"] == "ct_rate_nifti"


def test_ct_rate_v2_volume_not_rescaled_twice(tmp_path: Path) -> None:
    path, hu = _ct_rate_like(tmp_path, in_hu=True)
    volume = load_ct(path, ct_rate_metadata=CT_RATE_ROW)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.metadata["ct_rate"]["rescale"].startswith("skipped: values already in HU")
    forced = load_ct(path, ct_rate_metadata=CT_RATE_ROW, ct_rate_rescale="apply")
    np.testing.assert_array_equal(forced.hu, hu - 1024.0)  # the explicit option does what it says


def test_ct_rate_bad_spacing_value(tmp_path: Path) -> None:
    path, _ = _ct_rate_like(tmp_path, in_hu=True)
    with pytest.raises(CTInputError, match="XYSpacing"):
        load_ct(path, ct_rate_metadata={**CT_RATE_ROW, "XYSpacing": "[0.7, oops]"})
