"""Windows (hand-computed grey levels) and CT volume -> ordered slice images + series prompt."""

from __future__ import annotations

import numpy as np
import pytest

from domain_data.medical.ct import CTVolume
from domain_data.medical.errors import CTInputError
from domain_data.medical.slices import (
    MAX_SLICES,
    MIN_SLICES,
    ct_to_slices,
    montage,
    render_slab,
    render_slice,
    slab_bounds,
    slab_token_cover,
)
from domain_data.medical.windows import WINDOWS, apply_window, multi_window_rgb
from longllava.protocol import count_images, series_prompt


def test_window_definitions() -> None:
    assert (WINDOWS["lung"].width, WINDOWS["lung"].level) == (1500, -600)
    assert (WINDOWS["mediastinum"].width, WINDOWS["mediastinum"].level) == (350, 50)
    assert {"bone", "wide"} <= set(WINDOWS)


def test_apply_window_hand_computed() -> None:
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0], dtype=np.float32)
    # lung: 0 at -1350, 255 at +150, (x + 1350) * 255 / 1500 rounded
    np.testing.assert_array_equal(apply_window(hu, "lung"), [0, 0, 128, 255, 255])
    # mediastinum: -125 -> 0, 225 -> 255, 50 -> 127.5 -> 128, 0 -> 91.07 -> 91
    np.testing.assert_array_equal(apply_window(np.array([-125.0, 0.0, 50.0, 225.0]), "mediastinum"),
                                  [0, 91, 128, 255])
    with pytest.raises(CTInputError, match="unknown CT window 'soft'"):
        apply_window(hu, "soft")


def test_multi_window_rgb_channels() -> None:
    plane = np.array([[-1000.0, 40.0], [700.0, 1500.0]], dtype=np.float32)
    rgb = multi_window_rgb(plane)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    for channel, name in enumerate(("lung", "mediastinum", "bone")):
        np.testing.assert_array_equal(rgb[..., channel], apply_window(plane, name))
    with pytest.raises(CTInputError):
        multi_window_rgb(np.zeros((2, 2, 2)))


def _volume(n: int, rows: int = 12, cols: int = 12, spacing=(2.0, 1.0, 1.0), offsets=None) -> CTVolume:
    hu = np.full((n, rows, cols), -1000.0, dtype=np.float32)
    hu[:, :, :] += (np.arange(n, dtype=np.float32) * 10.0)[:, None, None]  # z ramp
    return CTVolume(hu, spacing, np.eye(4), {}, None if offsets is None else np.asarray(offsets, float))


def _grey(image) -> np.ndarray:
    return np.asarray(image)[..., 0].astype(float)


def test_default_keeps_count_in_range() -> None:
    slices = ct_to_slices(_volume(150), window="wide", size=16)
    assert len(slices) == 150 and "own 150" in slices.resampled
    np.testing.assert_array_equal(slices.source_indices, np.arange(150))
    assert slices.prompt == series_prompt(150) and count_images(slices.prompt) == 150
    assert slices.images[0].size == (16, 16) and slices.images[0].mode == "RGB"


def test_short_study_resampled_up_to_min_and_ordered() -> None:
    slices = ct_to_slices(_volume(20), window="wide", size=16)
    assert len(slices) == MIN_SLICES and "resampled" in slices.resampled
    means = [_grey(im)[4:12, 4:12].mean() for im in slices.images]
    assert all(b >= a for a, b in zip(means, means[1:]))  # inferior -> superior, monotone ramp
    # plane 50 of 100 over 19 mm sits at index 50 * 19 / 99 = 9.596 -> HU -1000 + 95.96
    expected = (-1000 + 95.96 + 1000) * 255 / 2000
    assert abs(_grey(slices.images[50])[8, 8] - expected) <= 1.0


def test_long_study_clipped_to_max() -> None:
    slices = ct_to_slices(_volume(1200, rows=4, cols=4), window="lung", size=8)
    assert len(slices) == MAX_SLICES and slices.source_indices[-1] == pytest.approx(1199)


def test_num_slices_and_spacing_options() -> None:
    volume = _volume(200)  # 398 mm extent at 2 mm
    assert len(ct_to_slices(volume, num_slices=7, size=8)) == 7
    assert len(ct_to_slices(volume, spacing_mm=1.0, size=8)) == 399
    assert len(ct_to_slices(volume, spacing_mm=10.0, size=8)) == MIN_SLICES  # 40 clipped to 100
    with pytest.raises(CTInputError, match="not both"):
        ct_to_slices(volume, num_slices=10, spacing_mm=2.0)
    with pytest.raises(CTInputError, match="num_slices"):
        ct_to_slices(volume, num_slices=2000)
    with pytest.raises(CTInputError, match="spacing_mm"):
        ct_to_slices(volume, spacing_mm=-1.0)


def test_uneven_offsets_sampled_on_real_positions() -> None:
    offsets = [0.0, 1.0, 2.0, 10.0]  # four planes, a gap between 2 and 10 mm
    slices = ct_to_slices(_volume(4, offsets=offsets), num_slices=6, window="wide", size=8)
    np.testing.assert_allclose(slices.positions_mm, [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(slices.source_indices, [0, 2, 2.25, 2.5, 2.75, 3])


def test_aspect_kept_with_black_padding() -> None:
    plane = np.full((10, 20), 40.0, dtype=np.float32)  # 10 rows x 20 cols, square pixels
    image = np.asarray(render_slice(plane, "mediastinum", 20))
    assert image.shape == (20, 20, 3)
    assert image[:5].max() == 0 and image[15:].max() == 0 and image[5:15].min() > 0
    wide_pixels = np.asarray(render_slice(np.full((10, 10), 40.0, np.float32), "mediastinum", 20, (2.0, 1.0)))
    assert wide_pixels[:, :5].max() == 0 and wide_pixels[:, 5:15].min() > 0  # 20 mm tall x 10 mm wide


def test_montage_layout() -> None:
    slices = ct_to_slices(_volume(100), window="wide", size=16)
    sheet = montage(slices, columns=4, max_images=10, tile=8)
    assert sheet.size == (32, 24)
    with pytest.raises(CTInputError):
        montage([])


def test_slab_bounds_cover_every_plane_once_in_order() -> None:
    bounds = slab_bounds(120, 16)
    assert bounds.shape == (16, 2) and bounds[0, 0] == 0 and bounds[-1, 1] == 119
    np.testing.assert_array_equal(bounds[1:, 0], bounds[:-1, 1] + 1)  # consecutive, no gap, no overlap
    assert set(bounds[:, 1] - bounds[:, 0] + 1) == {7, 8}  # 120 / 16 = 7.5 planes each
    np.testing.assert_array_equal(slab_bounds(3, 5), [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]])
    with pytest.raises(CTInputError, match="at least one plane"):
        slab_bounds(0, 4)


def test_render_slab_channels_are_min_mean_max_projections() -> None:
    planes = np.full((3, 4, 4), -850.0, dtype=np.float32)
    planes[0, 0, 0] = -975.0  # a low-attenuation voxel in the first plane
    planes[2, 3, 3] = 35.0  # a soft-tissue voxel in the last plane
    rgb = np.asarray(render_slab(planes, size=4))
    np.testing.assert_array_equal(rgb[..., 0], apply_window(planes.min(axis=0), "emphysema"))
    np.testing.assert_array_equal(rgb[..., 1], apply_window(planes.mean(axis=0), "mediastinum"))
    np.testing.assert_array_equal(rgb[..., 2], apply_window(planes.max(axis=0), "lung"))
    assert rgb[0, 0, 0] < rgb[1, 1, 0] and rgb[3, 3, 2] > rgb[1, 1, 2]
    with pytest.raises(CTInputError, match="planes"):
        render_slab(planes[0], size=4)


def test_slab_window_shows_a_finding_between_sampled_planes() -> None:
    volume = _volume(120)
    volume.hu[:] = -850.0
    volume.hu[3, 5:7, 5:7] = 35.0  # a "nodule" on plane 3 only; 16 sampled planes are 0, 7.9, 15.9, ...
    sampled = ct_to_slices(volume, num_slices=16, window="lung", size=12)
    slabs = ct_to_slices(volume, num_slices=16, window="slab", size=12)
    assert len(slabs) == 16 and slabs.window == "slab" and slabs.prompt == series_prompt(16)
    assert "slab of 7-8" in slabs.resampled
    assert max(_grey(image).max() for image in sampled.images) == _grey(sampled.images[0]).min()  # missed
    blue = [np.asarray(image)[..., 2].astype(int) for image in slabs.images]
    assert blue[0][5, 5] - blue[0][0, 0] > 100 and all(b.max() == b.min() for b in blue[1:])
    np.testing.assert_allclose(slabs.source_indices[:2], [3.0, 10.5])  # slab middles (planes 0-6, 7-14)
    np.testing.assert_allclose(slabs.positions_mm[:2], [6.0, 21.0])  # 2 mm apart


def test_slab_token_cover_counts_the_pixels_render_slab_draws_in_each_token_cell() -> None:
    volume = _volume(20)
    volume.hu[:] = -850.0
    mask = np.zeros(volume.hu.shape, dtype=bool)
    mask[12:14, 2:4, 9:11] = True  # planes 12-13: slab 2 of 4 (planes 10-14); rows 2-3, columns 9-10
    volume.hu[mask] = 35.0
    pixel_mm = (float(volume.spacing_mm[1]), float(volume.spacing_mm[2]))
    slabs = ct_to_slices(volume, num_slices=4, window="slab", size=24)
    cover = slab_token_cover(mask, 4, 24, grid=3, pixel_mm=pixel_mm)  # 3 x 3 cells of 8 x 8 px
    assert cover.shape == (4, 9) and not cover[[0, 1, 3]].any()
    blue = np.asarray(slabs.images[2])[..., 2].astype(int)
    drawn = blue > (blue.min() + blue.max()) / 2  # where the slab shows the dense block
    cells = drawn.reshape(3, 8, 3, 8).sum(axis=(1, 3)).ravel()
    assert cover[2].sum() > 0 and np.array_equal(cover[2] > 0, cells > 0)
    assert abs(int(cover[2].sum()) - int(drawn.sum())) <= 0.25 * drawn.sum()
    with pytest.raises(CTInputError, match="grid"):
        slab_token_cover(mask, 4, 24, grid=30)
