"""CT phantoms: determinism, anatomy HU, and every finding measured in the volume itself."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from domain_data.synthetic.ct_phantom import (
    LABEL_HU,
    LABELS,
    LUNG_FIELD_LABELS,
    RENDERABLE_FINDINGS,
    finding_masks,
    make_ct_phantom,
    read_label_map,
    write_label_map,
)
from domain_data.synthetic.errors import SyntheticDataError
from longllava.errors import UserInputError

SIZE, SLICES = 112, 90


def lung_field(phantom) -> np.ndarray:
    """Where lung tissue (normal or diseased) is: the region findings are measured in."""
    return np.isin(phantom.labels, [LABELS[name] for name in LUNG_FIELD_LABELS])


def side_of_columns(columns: np.ndarray, size: int) -> str:
    """Patient's side from image columns (x grows towards the patient's left)."""
    left, right = bool(np.any(columns >= size / 2)), bool(np.any(columns < size / 2))
    return "both" if left and right else ("left" if left else "right")


@pytest.fixture(scope="module")
def normal():
    return make_ct_phantom(3, findings=[], n_slices=SLICES, size=SIZE)


def test_same_seed_same_volume_and_truth():
    a = make_ct_phantom(11, n_slices=SLICES, size=SIZE)
    b = make_ct_phantom(11, n_slices=SLICES, size=SIZE)
    c = make_ct_phantom(12, n_slices=SLICES, size=SIZE)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.ground_truth_json() == b.ground_truth_json()
    assert not np.array_equal(a.hu, c.hu)


def test_shape_dtype_spacing_and_default_slice_count():
    phantom = make_ct_phantom(5, findings=[], size=64)
    assert 100 <= phantom.shape[0] <= 300
    assert phantom.hu.dtype == np.float32 and phantom.shape[1:] == (64, 64)
    assert phantom.spacing[0] == pytest.approx(300.0 / phantom.shape[0], abs=1e-3)
    assert phantom.spacing[1] == phantom.spacing[2] == pytest.approx(360.0 / 64, abs=1e-3)


def test_organ_hu_ranges(normal):
    hu, labels = normal.hu, normal.labels
    for name in ("air", "fat", "muscle", "lung", "heart", "bone", "mediastinal fat", "aorta"):
        voxels = hu[labels == LABELS[name]]
        assert voxels.size > 100, name
        assert abs(float(voxels.mean()) - LABEL_HU[name]) < 5, name
    assert hu[labels == LABELS["air"]].max() < -900
    assert -900 < float(np.median(hu[labels == LABELS["lung"]])) < -800
    assert float(np.median(hu[labels == LABELS["bone"]])) >= 700
    assert hu.min() >= -1024 and hu.max() <= 3071
    # both lungs, the heart between them, the spine posterior
    z = int(np.argmax((labels == LABELS["heart"]).sum(axis=(1, 2))))
    lung_cols = np.flatnonzero((labels[z] == LABELS["lung"]).any(axis=0))
    assert lung_cols.min() < SIZE * 0.3 and lung_cols.max() > SIZE * 0.7
    spine_rows = np.flatnonzero((labels[z] == LABELS["bone"])[:, SIZE // 2 - 2 : SIZE // 2 + 2].any(axis=1))
    heart_rows = np.flatnonzero((labels[z] == LABELS["heart"]).any(axis=1))
    assert spine_rows.max() > heart_rows.max()  # spine behind the heart (y grows posteriorly)


def test_normal_phantom_has_no_findings(normal):
    assert normal.present_findings() == []
    assert normal.findings["Lung nodule"].count == 0
    field = lung_field(normal)
    assert np.count_nonzero(field & (normal.hu > -400)) == 0  # nothing dense in the lungs
    assert np.count_nonzero(field & (normal.hu < -950)) / field.sum() < 1e-3  # no low-attenuation area


@pytest.mark.parametrize("count,side", [(1, "left"), (3, "right"), (4, "both")])
def test_lung_nodules_counted_in_volume(count, side):
    phantom = make_ct_phantom(
        21 + count, findings={"Lung nodule": {"count": count, "side": side}}, n_slices=SLICES, size=SIZE
    )
    truth = phantom.findings["Lung nodule"]
    dense = lung_field(phantom) & (phantom.hu > -400)
    components, n = ndimage.label(dense)
    assert n == count == truth.count
    z, _, x = np.nonzero(components)
    assert side_of_columns(x, SIZE) == side == truth.side
    assert (int(z.min()), int(z.max())) == truth.slices
    assert 0 < float(np.median(phantom.hu[dense])) < 70  # soft tissue


def test_pleural_effusion_layer_at_posterior_base():
    phantom = make_ct_phantom(31, findings={"Pleural effusion": {"side": "left"}}, n_slices=SLICES, size=SIZE)
    field = lung_field(phantom)
    fluid = field & (phantom.hu > -100) & (phantom.hu < 60)
    truth = phantom.findings["Pleural effusion"]
    ml = fluid.sum() * np.prod(phantom.spacing) / 1000
    assert ml > 10 and ml == pytest.approx(truth.details["volume_ml"], rel=0.05)
    z, y, x = np.nonzero(fluid)
    assert side_of_columns(x, SIZE) == "left" == truth.side
    lung_z = np.flatnonzero(field.any(axis=(1, 2)))
    assert z.min() - lung_z.min() <= 2 and z.max() < lung_z.min() + 0.5 * (lung_z.max() - lung_z.min())
    assert y.mean() > np.nonzero(field)[1].mean()  # posterior (dependent) part
    assert abs(float(np.median(phantom.hu[fluid])) - 12) < 5


def cardiothoracic_ratio(phantom) -> float:
    """Heart = largest soft-tissue component inside the rib cage; ratio of widest transverse extents."""
    cage = np.isin(
        phantom.labels, [LABELS[n] for n in (*LUNG_FIELD_LABELS, "heart", "mediastinal fat", "aorta")]
    )
    soft = cage & (phantom.hu > 0) & (phantom.hu < 80)
    components, n = ndimage.label(soft)
    heart = components == (1 + int(np.argmax(ndimage.sum(soft, components, range(1, n + 1)))))
    heart_width = heart.any(axis=1).sum(axis=1).max()
    cage_width = cage.any(axis=1).sum(axis=1).max()
    return float(heart_width / cage_width)


def test_cardiomegaly_enlarges_the_heart(normal):
    big = make_ct_phantom(3, findings=["Cardiomegaly"], n_slices=SLICES, size=SIZE)
    assert cardiothoracic_ratio(normal) < 0.45
    assert cardiothoracic_ratio(big) > 0.5
    assert big.findings["Cardiomegaly"].details["cardiothoracic_ratio"] > 0.5
    assert normal.findings["Cardiomegaly"].details["cardiothoracic_ratio"] < 0.45


def test_emphysema_low_attenuation_area():
    phantom = make_ct_phantom(41, findings={"Emphysema": {"side": "right"}}, n_slices=SLICES, size=SIZE)
    field = lung_field(phantom)
    low = field & (phantom.hu < -950)
    laa = 100 * low.sum() / field.sum()
    assert laa > 1.0
    z, _, x = np.nonzero(low)
    assert side_of_columns(x, SIZE) == "right"
    lung_z = np.flatnonzero(field.any(axis=(1, 2)))
    assert np.median(z) > np.median(lung_z)  # upper-lobe predominant


def test_consolidation_is_a_large_dense_region():
    phantom = make_ct_phantom(51, findings={"Consolidation": {"side": "both"}}, n_slices=SLICES, size=SIZE)
    dense = lung_field(phantom) & (phantom.hu > -300)
    components, n = ndimage.label(dense)
    sizes_ml = ndimage.sum(dense, components, range(1, n + 1)) * np.prod(phantom.spacing) / 1000
    assert n >= 2 and sorted(sizes_ml)[-2] > 5  # one region per lung, far larger than any nodule
    assert side_of_columns(np.nonzero(dense)[2], SIZE) == "both" == phantom.findings["Consolidation"].side


def test_all_findings_together_match_their_labels():
    phantom = make_ct_phantom(61, findings=list(RENDERABLE_FINDINGS), n_slices=SLICES, size=SIZE)
    assert phantom.present_findings() == list(RENDERABLE_FINDINGS)
    codes = {
        "Lung nodule": "nodule",
        "Pleural effusion": "pleural effusion",
        "Emphysema": "emphysema",
        "Consolidation": "consolidation",
    }
    for name, label in codes.items():
        mask = phantom.labels == LABELS[label]
        z = np.flatnonzero(mask.any(axis=(1, 2)))
        assert (int(z[0]), int(z[-1])) == phantom.findings[name].slices, name
        assert abs(float(phantom.hu[mask].mean()) - LABEL_HU[label]) < 5, name
    assert phantom.label_vector() == [1, 1, 1, 1, 1]


def test_finding_params_apply_to_drawn_findings():
    params = {"Lung nodule": {"radius_range_mm": (9.0, 10.0), "count_range": (2, 2)}}
    for seed in range(4):
        phantom = make_ct_phantom(seed, n_slices=SLICES, size=SIZE, finding_params=params)
        nodules = phantom.findings["Lung nodule"]
        if nodules.present:
            assert nodules.count == 2
            assert all(9.0 <= n["radius_mm"] <= 10.0 for n in nodules.details["nodules"])
    explicit = make_ct_phantom(
        1, findings={"Lung nodule": {"count": 1}}, n_slices=SLICES, size=SIZE, finding_params=params
    )
    assert explicit.findings["Lung nodule"].count == 1  # explicit parameters win


def test_random_findings_follow_probability():
    drawn = np.array([make_ct_phantom(s, n_slices=20, size=48).label_vector() for s in range(40)])
    assert 0.25 < drawn.mean() < 0.75  # p = 0.5 per finding
    assert drawn.sum(axis=0).min() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"findings": ["Lung opacity"]},
        {"findings": "Cardiomegaly"},
        {"n_slices": 5},
        {"size": 8},
        {"findings": {"Lung nodule": {"side": "middle"}}},
    ],
)
def test_bad_requests_are_user_errors(kwargs):
    with pytest.raises(SyntheticDataError) as error:
        make_ct_phantom(0, **{"n_slices": 20, "size": 48, **kwargs})
    assert isinstance(error.value, UserInputError)


def measure_findings(phantom) -> dict[str, bool]:
    """Each finding judged from HU alone inside the lung field (and the rib cage for the heart)."""
    field = lung_field(phantom)
    dense = field & (phantom.hu > -400)
    components, n = ndimage.label(dense)
    index = range(1, n + 1)
    volume_ml = np.asarray(ndimage.sum(dense, components, index)) * np.prod(phantom.spacing) / 1000
    mean_hu = np.asarray(ndimage.mean(phantom.hu, components, index)) if n else np.zeros(0)
    return {
        "Lung nodule": bool(np.any((volume_ml < 2.5) & (mean_hu > 21))),
        "Pleural effusion": bool(np.any((volume_ml > 1.0) & (mean_hu < 21))),
        "Cardiomegaly": cardiothoracic_ratio(phantom) > 0.5,
        "Emphysema": np.count_nonzero(field & (phantom.hu < -950)) / field.sum() > 0.005,
        "Consolidation": bool(np.any((volume_ml >= 2.5) & (mean_hu > 21))),
    }


@pytest.mark.parametrize("name", [None, *RENDERABLE_FINDINGS])
def test_only_the_declared_finding_is_measurable(name):
    phantom = make_ct_phantom(70, findings=[name] if name else [], n_slices=SLICES, size=SIZE)
    measured = measure_findings(phantom)
    declared = {finding: phantom.findings[finding].present for finding in RENDERABLE_FINDINGS}
    assert measured == declared


def test_finding_masks_locate_each_present_finding_by_side(tmp_path):
    phantom = make_ct_phantom(62, findings={"Lung nodule": {"count": 2, "side": "both"}, "Consolidation": {"side": "left"},
                                            "Cardiomegaly": {}}, n_slices=SLICES, size=SIZE)
    masks = phantom.finding_masks()
    assert set(masks) == {"Lung nodule", "Lung nodule left", "Lung nodule right", "Cardiomegaly",
                          "Consolidation", "Consolidation left", "Consolidation right"}
    for nodule in phantom.findings["Lung nodule"].details["nodules"]:
        assert masks[f"Lung nodule {nodule['side']}"][tuple(nodule["centre_zyx"])]
    assert masks["Lung nodule left"].any() and masks["Lung nodule right"].any()
    assert np.array_equal(masks["Lung nodule left"] | masks["Lung nodule right"], masks["Lung nodule"])
    assert side_of_columns(np.flatnonzero(masks["Consolidation"].any(axis=(0, 1))), SIZE) == "left"
    assert not masks["Consolidation right"].any()
    assert np.array_equal(masks["Cardiomegaly"], phantom.labels == LABELS["heart"])
    path = write_label_map(phantom, tmp_path / "study_labels.npy.gz")
    assert path.read_bytes() == write_label_map(phantom, tmp_path / "again.npy.gz").read_bytes()  # no time stamp
    truth = phantom.ground_truth()["findings"]
    reread = finding_masks(read_label_map(path), truth)
    assert all(np.array_equal(reread[name], mask) for name, mask in masks.items())
    with pytest.raises(SyntheticDataError, match="missing_labels.npy.gz: label map not found; rebuild"):
        read_label_map(tmp_path / "missing_labels.npy.gz")
    (tmp_path / "broken.npy.gz").write_bytes(b"not gzip")
    with pytest.raises(SyntheticDataError, match="broken.npy.gz: not a gzipped .npy label map"):
        read_label_map(tmp_path / "broken.npy.gz")
