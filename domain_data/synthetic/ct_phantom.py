"""Seeded chest-CT phantoms in Hounsfield units, with findings named as in CT-RATE.

Geometry and orientation (shared by the NIfTI and DICOM writers):

* ``Phantom.hu`` is float32 ``(z, y, x)``. ``z`` runs from the most inferior slice (index 0) to the most
  superior; ``y`` (image rows) runs anterior -> posterior; ``x`` (image columns) runs from the patient's
  right to the patient's left. That is DICOM's LPS patient axes with an axial
  ``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``: the usual radiological display, where the patient's
  right lung is on the image's left.
* "left" / "right" always mean the patient's side. User-facing slice numbers (see ``qa.py``) are 1-based
  along ``z`` (inferior -> superior); ground truth stores 0-based inclusive index ranges.
* ``spacing`` is ``(z, y, x)`` in mm; the field of view is 360 mm in-plane and 300 mm along ``z``, so
  100-300 slices give 3-1 mm slice spacing.

Anatomy (HU before noise): air -1000, subcutaneous fat -100, chest-wall muscle 50, mediastinal fat -70,
abdominal soft tissue 55, lungs -850, heart 40, aorta 45, trachea -1000, bone (spine, ribs, sternum) 750,
discs 80, costal cartilage 120, spinal canal 15. Gaussian noise (sigma 12 HU, 18 HU in the lungs).

Findings (CT-RATE label names, spelled exactly):

* ``Lung nodule``: soft-tissue spheres (35 HU, 3-7 mm radius) fully surrounded by normal lung;
* ``Pleural effusion``: a 12 HU fluid layer in the posterior lung base, a meniscus thinning upwards;
* ``Cardiomegaly``: the heart enlarged (cardiothoracic ratio above 0.5 instead of about 0.4);
* ``Emphysema``: -975 HU patches in the upper two thirds of a lung (LAA-950 of several %);
* ``Consolidation``: a 30 HU region of a few cm inside a lung.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domain_data.synthetic.errors import SyntheticDataError

RENDERABLE_FINDINGS: tuple[str, ...] = (
    "Lung nodule",
    "Pleural effusion",
    "Cardiomegaly",
    "Emphysema",
    "Consolidation",
)
SIDES: tuple[str, ...] = ("left", "right", "both")
LATERAL_FINDINGS: tuple[str, ...] = ("Lung nodule", "Pleural effusion", "Emphysema", "Consolidation")

FOV_XY_MM = 360.0
FOV_Z_MM = 300.0
NOISE_HU = 12.0
LUNG_NOISE_HU = 18.0

# Tissue labels of the ground-truth label map and their mean HU.
LABELS: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "muscle": 2,
    "soft tissue": 3,
    "mediastinal fat": 4,
    "lung": 5,
    "heart": 6,
    "aorta": 7,
    "trachea": 8,
    "bone": 9,
    "disc": 10,
    "cartilage": 11,
    "spinal canal": 12,
    "nodule": 20,
    "pleural effusion": 21,
    "emphysema": 22,
    "consolidation": 23,
}
LABEL_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "soft tissue": 55.0,
    "mediastinal fat": -70.0,
    "lung": -850.0,
    "heart": 40.0,
    "aorta": 45.0,
    "trachea": -1000.0,
    "bone": 750.0,
    "disc": 80.0,
    "cartilage": 120.0,
    "spinal canal": 15.0,
    "nodule": 35.0,
    "pleural effusion": 12.0,
    "emphysema": -975.0,
    "consolidation": 30.0,
}
LUNG_FIELD_LABELS: tuple[str, ...] = ("lung", "nodule", "pleural effusion", "emphysema", "consolidation")


@dataclass(frozen=True)
class Finding:
    """Ground truth of one CT-RATE finding in a phantom.

    ``slices`` is a 0-based inclusive ``(first, last)`` z-index range; ``side`` is the patient's
    ``left``/``right``/``both`` (``None`` for findings without a side, e.g. cardiomegaly, or when absent).
    """

    name: str
    present: bool
    side: str | None = None
    slices: tuple[int, int] | None = None
    count: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "present": self.present,
            "side": self.side,
            "slices": list(self.slices) if self.slices is not None else None,
            "count": self.count,
            "details": self.details,
        }


@dataclass
class Phantom:
    """A seeded chest-CT phantom: HU volume ``(z, y, x)``, spacing ``(z, y, x)`` mm, label map, findings."""

    seed: int
    hu: np.ndarray  # float32 (z, y, x)
    spacing: tuple[float, float, float]
    labels: np.ndarray  # uint8 (z, y, x), codes of LABELS
    findings: dict[str, Finding]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def origin_lps(self) -> tuple[float, float, float]:
        """LPS position (mm) of voxel (z=0, y=0, x=0): the FOV is centred on the origin."""
        nz, ny, nx = self.hu.shape
        sz, sy, sx = self.spacing
        return (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz)

    def present_findings(self) -> list[str]:
        return [name for name in RENDERABLE_FINDINGS if self.findings[name].present]

    def label_vector(self) -> list[int]:
        """0/1 per :data:`RENDERABLE_FINDINGS`, in that order (a CT-RATE style label row)."""
        return [int(self.findings[name].present) for name in RENDERABLE_FINDINGS]

    def ground_truth(self) -> dict[str, Any]:
        """JSON-ready ground truth (no voxel data)."""
        return {
            "seed": self.seed,
            "shape_zyx": list(self.shape),
            "spacing_zyx_mm": list(self.spacing),
            "orientation": "z inferior->superior, y anterior->posterior, x patient right->left (LPS)",
            "findings": {name: self.findings[name].to_json() for name in RENDERABLE_FINDINGS},
        }

    def ground_truth_json(self) -> str:
        return json.dumps(self.ground_truth(), sort_keys=True, indent=2)

    def finding_masks(self) -> dict[str, np.ndarray]:
        """Where each present finding is: see :func:`finding_masks`."""
        return finding_masks(self.labels, {name: f.to_json() for name, f in self.findings.items()})


# Label-map code(s) of each finding's voxels; cardiomegaly is the (enlarged) heart itself.
FINDING_LABELS: dict[str, str] = {
    "Lung nodule": "nodule",
    "Pleural effusion": "pleural effusion",
    "Cardiomegaly": "heart",
    "Emphysema": "emphysema",
    "Consolidation": "consolidation",
}
LABEL_MAP_SUFFIX = "_labels.npy.gz"


def finding_masks(labels: np.ndarray, findings: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Boolean ``(z, y, x)`` voxel masks of the present findings of a phantom's label map ``labels``
    (``findings``: its ground truth, :meth:`Finding.to_json` per name), keyed by finding name and, for the
    findings with a side, ``"<name> left"`` / ``"<name> right"`` (the patient's left is the image's right,
    ``x >= X / 2``). Absent findings have no key."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise SyntheticDataError(f"a phantom label map is (z, y, x), got shape {labels.shape}")
    left = np.arange(labels.shape[2]) >= labels.shape[2] / 2  # (X,) patient's left columns
    masks: dict[str, np.ndarray] = {}
    for name in RENDERABLE_FINDINGS:
        if not (findings.get(name) or {}).get("present"):
            continue
        mask = labels == LABELS[FINDING_LABELS[name]]
        masks[name] = mask
        if name in LATERAL_FINDINGS:
            masks[f"{name} left"] = mask & left
            masks[f"{name} right"] = mask & ~left
    return masks


def write_label_map(phantom: Phantom, path: str | Path) -> Path:
    """Save the phantom's ``(z, y, x)`` label map (codes of :data:`LABELS`) as a gzipped ``.npy`` (no
    time stamp: the same phantom gives the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(phantom.labels, dtype=np.uint8))
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return path


def read_label_map(path: str | Path) -> np.ndarray:
    """The ``(z, y, x)`` uint8 label map written by :func:`write_label_map`."""
    path = Path(path)
    if not path.is_file():
        raise SyntheticDataError(f"{path}: label map not found; rebuild the synthetic set "
                                 "(python -m finetune.demo_data --out DIR) to write one beside each CT study")
    try:
        labels = np.load(io.BytesIO(gzip.decompress(path.read_bytes())), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise SyntheticDataError(f"{path}: not a gzipped .npy label map ({error}); rebuild the synthetic set") from error
    if labels.ndim != 3:
        raise SyntheticDataError(f"{path}: a label map is (z, y, x), got shape {labels.shape}")
    return labels


@dataclass(frozen=True)
class _Grid:
    """Normalised coordinates: ``u`` (x, right->left) and ``v`` (y, anterior->posterior) in [-1, 1];
    ``t`` (z, inferior->superior) in (0, 1)."""

    u: np.ndarray  # (1, 1, X)
    v: np.ndarray  # (1, Y, 1)
    t: np.ndarray  # (Z, 1, 1)
    spacing: tuple[float, float, float]


def _make_grid(n_slices: int, size: int, spacing: tuple[float, float, float]) -> _Grid:
    u = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).reshape(1, 1, size)
    v = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).reshape(1, size, 1)
    t = ((np.arange(n_slices, dtype=np.float32) + 0.5) / n_slices).reshape(n_slices, 1, 1)
    return _Grid(u=u, v=v, t=t, spacing=spacing)


# --------------------------------------------------------------------------------------------- anatomy
BODY_CENTRE_V, BODY_RU, BODY_RV = 0.05, 0.86, 0.62
LUNG_CU, LUNG_CV, LUNG_RU, LUNG_RV = 0.42, -0.02, 0.30, 0.45
LUNG_APEX_T, LUNG_BASE_T = 0.97, 0.15
HEART_CU, HEART_CV, HEART_CT = 0.08, -0.12, 0.36
HEART_R = (0.27, 0.23, 0.16)  # (u, v, t) radii
CARDIOMEGALY_SCALE = (1.6, 1.3, 1.2)
RIB_PERIOD_MM, RIB_THICKNESS_MM, DISC_PERIOD_MM, DISC_THICKNESS_MM = 26.0, 10.0, 25.0, 4.0


def _body_radius(grid: _Grid) -> np.ndarray:
    """Normalised elliptic radius of the body outline, (1, Y, X); 1.0 is the skin."""
    return np.sqrt((grid.u / BODY_RU) ** 2 + ((grid.v - BODY_CENTRE_V) / BODY_RV) ** 2)


def _diaphragm(grid: _Grid) -> np.ndarray:
    """Height ``t`` (1, Y, X) of the diaphragm: a dome under each lung, lowest at the lung's rim
    (the costophrenic recesses), highest under its centre. Below it: liver, spleen (soft tissue)."""
    dome = np.zeros((1, grid.v.shape[1], grid.u.shape[2]), dtype=np.float32)
    for sign in (-1.0, 1.0):
        ellipse = ((grid.u - sign * LUNG_CU) / LUNG_RU) ** 2 + ((grid.v - LUNG_CV) / LUNG_RV) ** 2  # (1,Y,X)
        dome = np.maximum(dome, np.clip(1 - ellipse, 0, 1))
    return LUNG_BASE_T + 0.1 * dome


def _lung_masks(grid: _Grid, cavity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) lung masks (Z, Y, X) before the heart and mediastinum are carved out."""
    scale = np.sqrt(np.clip((LUNG_APEX_T - grid.t) / 0.25, 0.0, 1.0))  # (Z,1,1): tapering apex
    masks = []
    for sign in (-1.0, 1.0):  # patient right (image left, u < 0), then patient left
        ellipse = ((grid.u - sign * LUNG_CU) / LUNG_RU) ** 2 + ((grid.v - LUNG_CV) / LUNG_RV) ** 2  # (1,Y,X)
        inside = (ellipse <= scale**2) & (grid.t > _diaphragm(grid)) & cavity
        inside &= (grid.u * sign) > 0.07  # a midline strip for the mediastinum
        masks.append(inside)
    return masks[0], masks[1]


def _heart_mask(grid: _Grid, enlarged: bool) -> np.ndarray:
    ru, rv, rt = HEART_R
    if enlarged:
        ru, rv, rt = ru * CARDIOMEGALY_SCALE[0], rv * CARDIOMEGALY_SCALE[1], rt * CARDIOMEGALY_SCALE[2]
    inplane = ((grid.u - HEART_CU) / ru) ** 2 + ((grid.v - HEART_CV) / rv) ** 2  # (1,Y,X)
    return inplane + ((grid.t - HEART_CT) / rt) ** 2 <= 1.0


def _periodic_band(grid: _Grid, period_mm: float, thickness_mm: float, phase_mm: float) -> np.ndarray:
    z_mm = grid.t * FOV_Z_MM  # (Z,1,1)
    return ((z_mm + phase_mm) % period_mm) < thickness_mm


def _anatomy_labels(grid: _Grid, enlarged_heart: bool, rib_phase_mm: float) -> np.ndarray:
    """Label map (Z, Y, X) of the normal anatomy."""
    rb = _body_radius(grid)  # (1,Y,X)
    nz, ny, nx = grid.t.shape[0], grid.v.shape[1], grid.u.shape[2]
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    body = np.broadcast_to(rb <= 1.0, labels.shape)
    labels[body] = LABELS["fat"]
    labels[np.broadcast_to(rb <= 0.92, labels.shape)] = LABELS["muscle"]
    cavity = rb <= 0.78
    thorax = grid.t > _diaphragm(grid)  # (Z,Y,X)
    interior = np.broadcast_to(rb <= 0.84, labels.shape)
    labels[interior] = LABELS["soft tissue"]
    labels[(rb <= 0.84) & thorax] = LABELS["mediastinal fat"]

    ribs_z = _periodic_band(grid, RIB_PERIOD_MM, RIB_THICKNESS_MM, rib_phase_mm) & (grid.t > 0.12)
    rib_ring = (rb > 0.78) & (rb <= 0.84)
    anterior_midline = (np.abs(grid.u) < 0.2) & (grid.v < 0)
    labels[ribs_z & rib_ring & ~anterior_midline] = LABELS["bone"]
    labels[ribs_z & rib_ring & anterior_midline] = LABELS["cartilage"]
    sternum = (np.abs(grid.u) < 0.06) & (grid.v < 0) & (rb > 0.74) & (rb <= 0.86)
    labels[sternum & (grid.t > 0.3) & (grid.t < 0.85)] = LABELS["bone"]

    right, left = _lung_masks(grid, cavity)
    labels[right | left] = LABELS["lung"]
    labels[_heart_mask(grid, enlarged_heart) & (rb <= 0.78)] = LABELS["heart"]
    aorta = ((grid.u - 0.14) ** 2 + (grid.v - 0.30) ** 2 <= 0.05**2) & (grid.t > 0.18) & (grid.t < 0.75)
    labels[aorta] = LABELS["aorta"]
    trachea = (grid.u**2 + (grid.v + 0.05) ** 2 <= 0.045**2) & (grid.t > 0.62)
    labels[trachea] = LABELS["trachea"]

    vertebra = grid.u**2 + (grid.v - 0.36) ** 2 <= 0.085**2  # (1,Y,X)
    discs = _periodic_band(grid, DISC_PERIOD_MM, DISC_THICKNESS_MM, rib_phase_mm + 7.0)
    labels[np.broadcast_to(vertebra, labels.shape)] = LABELS["bone"]
    labels[vertebra & discs] = LABELS["disc"]
    canal_r2 = grid.u**2 + (grid.v - 0.50) ** 2
    labels[np.broadcast_to((canal_r2 > 0.035**2) & (canal_r2 <= 0.06**2), labels.shape)] = LABELS["bone"]
    spinous = (np.abs(grid.u) < 0.02) & (grid.v > 0.55) & (grid.v < 0.64)
    labels[np.broadcast_to(spinous, labels.shape)] = LABELS["bone"]
    labels[np.broadcast_to(canal_r2 <= 0.035**2, labels.shape)] = LABELS["spinal canal"]
    return labels


# -------------------------------------------------------------------------------------------- findings
def _side_mask(grid: _Grid, side: str) -> np.ndarray:
    """(1,1,X) columns of the patient's ``side`` (left = image right, u > 0)."""
    return grid.u > 0 if side == "left" else grid.u < 0


def _sides_for(side: str | None, rng: np.random.Generator) -> list[str]:
    if side is None:
        side = str(rng.choice(SIDES))
    if side not in SIDES:
        raise SyntheticDataError(f"side {side!r} is not one of {', '.join(SIDES)}")
    return ["right", "left"] if side == "both" else [side]


def _slice_range(mask: np.ndarray) -> tuple[int, int] | None:
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    return (int(z[0]), int(z[-1])) if z.size else None


def _merge_sides(sides: Sequence[str]) -> str | None:
    unique = set(sides)
    if not unique:
        return None
    return "both" if len(unique) > 1 else unique.pop()


def _ellipsoid_in_box(
    centre_zyx: np.ndarray, radii_mm: Sequence[float], spacing: Sequence[float], shape: Sequence[int]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding-box slices and the boolean ellipsoid inside it (physical radii, anisotropic voxels)."""
    box, axes = [], []
    for axis in range(3):
        half = radii_mm[axis] / spacing[axis]
        lo = max(int(np.floor(centre_zyx[axis] - half)), 0)
        hi = min(int(np.ceil(centre_zyx[axis] + half)) + 1, shape[axis])
        box.append(slice(lo, hi))
        axes.append(((np.arange(lo, hi) - centre_zyx[axis]) * spacing[axis] / radii_mm[axis]) ** 2)
    inside = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :] <= 1.0
    return tuple(box), inside


def _random_lung_point(labels: np.ndarray, grid: _Grid, side: str, rng: np.random.Generator, t_range=(0, 1)):
    """A random voxel (z, y, x) of normal lung on ``side`` within a z fraction range, or None."""
    nz, _, nx = labels.shape
    z_lo, z_hi = int(t_range[0] * nz), max(int(t_range[1] * nz), int(t_range[0] * nz) + 1)
    x_cols = np.flatnonzero(_side_mask(grid, side).ravel())
    for _ in range(200):
        z = int(rng.integers(z_lo, z_hi))
        x = int(rng.choice(x_cols))
        rows = np.flatnonzero(labels[z, :, x] == LABELS["lung"])
        if rows.size:
            return np.array([z, int(rng.choice(rows)), x], dtype=np.float64)
    return None


def _render_nodules(labels, grid, params, rng) -> Finding:
    low, high = params.get("count_range", (1, 4))
    count = int(params.get("count", rng.integers(low, high + 1)))
    if not 1 <= count <= 8:
        raise SyntheticDataError(f"Lung nodule count must be 1-8, got {count}")
    sides = _sides_for(params.get("side"), rng)
    nodules, mask_all = [], np.zeros(labels.shape, dtype=bool)
    for i in range(count):
        side = sides[i % len(sides)]
        radius = float(params.get("radius_mm", rng.uniform(*params.get("radius_range_mm", (3.5, 7.0)))))
        for _ in range(100):
            centre = _random_lung_point(labels, grid, side, rng, t_range=(0.25, 0.9))
            if centre is None:
                continue
            box, ball = _ellipsoid_in_box(centre, [radius + 3.0] * 3, grid.spacing, labels.shape)
            margin_ok = np.all(labels[box][ball] == LABELS["lung"])
            if margin_ok:
                box, ball = _ellipsoid_in_box(centre, [radius] * 3, grid.spacing, labels.shape)
                labels[box][ball] = LABELS["nodule"]
                mask_all[box] |= ball
                nodules.append(
                    {
                        "side": side,
                        "centre_zyx": [int(round(c)) for c in centre],
                        "radius_mm": round(radius, 2),
                        "slices": list(_slice_range(_box_mask(labels.shape, box, ball))),
                    }
                )
                break
        else:
            raise SyntheticDataError(
                f"could not place lung nodule {i + 1} on the {side} side: lung too small"
            )
    return Finding(
        "Lung nodule",
        True,
        side=_merge_sides([n["side"] for n in nodules]),
        slices=_slice_range(mask_all),
        count=len(nodules),
        details={"nodules": nodules},
    )


def _box_mask(shape, box, inside) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[box] = inside
    return mask


def _lung_extent_t(labels: np.ndarray, side_cols: np.ndarray) -> tuple[float, float]:
    z = np.flatnonzero((labels[:, :, side_cols] == LABELS["lung"]).any(axis=(1, 2)))
    nz = labels.shape[0]
    return (z[0] + 0.5) / nz, (z[-1] + 0.5) / nz


def _render_effusion(labels, grid, params, rng) -> Finding:
    sides = _sides_for(params.get("side"), rng)
    height = float(params.get("height", rng.uniform(0.12, 0.22)))  # fraction of the z FOV
    depth = float(params.get("depth", rng.uniform(0.35, 0.55)))  # normalised v at the base
    mask_all = np.zeros(labels.shape, dtype=bool)
    for side in sides:
        cols = _side_mask(grid, side)
        t0, _ = _lung_extent_t(labels, np.flatnonzero(cols.ravel()))
        # posterior layer: the cut moves from `depth` above the back of the lung to the back as t rises
        v_cut = (LUNG_CV + LUNG_RV) - depth * np.clip(1 - (grid.t - t0) / height, 0, 1)  # (Z,1,1)
        fluid = (labels == LABELS["lung"]) & cols & (grid.v >= v_cut) & (grid.t <= t0 + height)
        labels[fluid] = LABELS["pleural effusion"]
        mask_all |= fluid
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    return Finding(
        "Pleural effusion",
        True,
        side=_merge_sides(sides),
        slices=_slice_range(mask_all),
        details={"volume_ml": round(float(mask_all.sum()) * voxel_ml, 1)},
    )


def _render_emphysema(labels, grid, params, rng) -> Finding:
    sides = _sides_for(params.get("side"), rng)
    n_patches = int(params.get("patches", rng.integers(10, 18)))
    mask_all = np.zeros(labels.shape, dtype=bool)
    for side in sides:
        for _ in range(n_patches):
            centre = _random_lung_point(labels, grid, side, rng, t_range=(0.45, 0.92))
            if centre is None:
                continue
            radii = rng.uniform(8.0, 16.0, size=3)
            box, blob = _ellipsoid_in_box(centre, radii, grid.spacing, labels.shape)
            patch = blob & (labels[box] == LABELS["lung"])
            labels[box][patch] = LABELS["emphysema"]
            mask_all[box] |= patch
    lung_field = np.isin(labels, [LABELS[n] for n in LUNG_FIELD_LABELS])
    return Finding(
        "Emphysema",
        True,
        side=_merge_sides(sides),
        slices=_slice_range(mask_all),
        details={"laa950_percent": round(100.0 * float(mask_all.sum()) / float(lung_field.sum()), 2)},
    )


def _consolidation_region(labels, grid, side, rng, min_ml: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """One connected consolidation region of at least ``min_ml`` on ``side``: (box, mask in box)."""
    from scipy import ndimage

    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    for _ in range(50):
        centre = _random_lung_point(labels, grid, side, rng, t_range=(0.3, 0.7))
        if centre is None:
            break
        box, blob = _ellipsoid_in_box(centre, rng.uniform(18.0, 30.0, size=3), grid.spacing, labels.shape)
        # keep 4 px of lung from the heart: a consolidation abutting it would read as a larger heart
        region = blob & (labels[box] == LABELS["lung"]) & ~_dilate_inplane(labels[box] == LABELS["heart"], 4)
        pieces, n = ndimage.label(region)
        if n == 0:
            continue
        largest = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
        if largest.sum() * voxel_ml >= min_ml:
            return box, largest
    raise SyntheticDataError(
        f"could not place a consolidation of {min_ml} ml on the {side} side: lung too small"
    )


def _render_consolidation(labels, grid, params, rng) -> Finding:
    sides = _sides_for(params.get("side"), rng)
    mask_all = np.zeros(labels.shape, dtype=bool)
    for side in sides:
        box, region = _consolidation_region(labels, grid, side, rng, float(params.get("min_ml", 5.0)))
        labels[box][region] = LABELS["consolidation"]
        mask_all[box] |= region
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    return Finding(
        "Consolidation",
        True,
        side=_merge_sides(sides),
        slices=_slice_range(mask_all),
        details={"volume_ml": round(float(mask_all.sum()) * voxel_ml, 1)},
    )


def _dilate_inplane(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a (z, y, x) mask by a square of ``radius`` pixels in each slice."""
    out = mask.copy()
    ny, nx = mask.shape[1:]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            src = mask[:, max(-dy, 0) : ny - max(dy, 0), max(-dx, 0) : nx - max(dx, 0)]
            out[:, max(dy, 0) : ny - max(-dy, 0), max(dx, 0) : nx - max(-dx, 0)] |= src
    return out


def _cardiothoracic_ratio(labels: np.ndarray) -> tuple[float, tuple[int, int] | None]:
    """Max over slices of heart width / inner thoracic width, and the heart's slice range."""
    heart = labels == LABELS["heart"]
    heart_cols = heart.any(axis=1)  # (Z, X)
    widths = heart_cols.sum(axis=1)
    z = int(np.argmax(widths))
    inner = np.isin(labels[z], [LABELS[n] for n in (*LUNG_FIELD_LABELS, "heart", "mediastinal fat", "aorta")])
    thorax_width = int(inner.any(axis=0).sum())
    return float(widths[z]) / max(thorax_width, 1), _slice_range(heart)


_RENDERERS = {
    "Pleural effusion": _render_effusion,
    "Consolidation": _render_consolidation,
    "Emphysema": _render_emphysema,
    "Lung nodule": _render_nodules,  # last: nodules need normal lung all around
}


# ---------------------------------------------------------------------------------------------- public
def _normalise_findings(
    findings: Mapping[str, Mapping[str, Any]] | Sequence[str] | None, rng: np.random.Generator, p: float
) -> dict[str, dict[str, Any]]:
    if findings is None:
        chosen = [name for name in RENDERABLE_FINDINGS if rng.random() < p]
        return {name: {} for name in chosen}
    if isinstance(findings, str):
        raise SyntheticDataError(
            f"findings must be a list or a mapping of names, got the string {findings!r}"
        )
    items = findings.items() if isinstance(findings, Mapping) else ((name, {}) for name in findings)
    result: dict[str, dict[str, Any]] = {}
    for name, params in items:
        if name not in RENDERABLE_FINDINGS:
            raise SyntheticDataError(
                f"finding {name!r} cannot be rendered: use CT-RATE names {', '.join(RENDERABLE_FINDINGS)}"
            )
        result[name] = dict(params or {})
    return result


def make_ct_phantom(
    seed: int,
    findings: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
    n_slices: int | None = None,
    size: int = 256,
    finding_probability: float = 0.5,
    finding_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Phantom:
    """A seeded chest-CT phantom.

    ``findings``: ``None`` draws each renderable finding with ``finding_probability``; a list of names
    renders those with seeded parameters; a mapping ``{name: params}`` fixes parameters
    (``Lung nodule``: ``count`` or ``count_range`` (1, 4), ``side``, ``radius_mm`` or ``radius_range_mm``
    (3.5, 7.0); ``Pleural effusion``: ``side``, ``height``,
    ``depth``; ``Emphysema``: ``side``, ``patches``; ``Consolidation``: ``side``, ``min_ml`` (5); sides are
    ``left``/``right``/``both``). ``finding_params`` gives default parameters per finding, used for
    drawn and listed findings alike (e.g. larger nodules for a small demo model). ``n_slices`` defaults
    to a seeded draw in 100-300.
    """
    rng = np.random.default_rng(seed)
    if n_slices is None:
        n_slices = int(rng.integers(100, 301))
    if not 16 <= n_slices <= 1000:
        raise SyntheticDataError(f"n_slices must be 16-1000, got {n_slices}")
    if not 32 <= size <= 1024:
        raise SyntheticDataError(f"size must be 32-1024 pixels, got {size}")
    wanted = _normalise_findings(findings, rng, finding_probability)
    defaults = _normalise_findings(dict(finding_params or {}), rng, finding_probability)
    wanted = {name: {**defaults.get(name, {}), **params} for name, params in wanted.items()}
    spacing = (round(FOV_Z_MM / n_slices, 4), round(FOV_XY_MM / size, 4), round(FOV_XY_MM / size, 4))
    grid = _make_grid(n_slices, size, spacing)
    labels = _anatomy_labels(
        grid, "Cardiomegaly" in wanted, rib_phase_mm=float(rng.uniform(0, RIB_PERIOD_MM))
    )

    result: dict[str, Finding] = {}
    for name, render in _RENDERERS.items():
        if name in wanted:
            result[name] = render(labels, grid, wanted[name], rng)
    ctr, heart_slices = _cardiothoracic_ratio(labels)
    result["Cardiomegaly"] = Finding(
        "Cardiomegaly",
        "Cardiomegaly" in wanted,
        slices=heart_slices if "Cardiomegaly" in wanted else None,
        details={"cardiothoracic_ratio": round(ctr, 3)},
    )
    for name in RENDERABLE_FINDINGS:
        result.setdefault(name, Finding(name, False, count=0 if name == "Lung nodule" else None))
    hu = _labels_to_hu(labels, rng)
    return Phantom(seed=seed, hu=hu, spacing=spacing, labels=labels, findings=result)


def _labels_to_hu(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lut = np.full(256, -1000.0, dtype=np.float32)
    sigma = np.full(256, NOISE_HU, dtype=np.float32)
    for name, code in LABELS.items():
        lut[code] = LABEL_HU[name]
    for name in ("lung", "emphysema"):
        sigma[LABELS[name]] = LUNG_NOISE_HU if name == "lung" else NOISE_HU
    noise = rng.standard_normal(labels.shape, dtype=np.float32)
    hu = lut[labels] + noise * sigma[labels]
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu


def phantom_hu(n_slices: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A small, fast ``(z, y, x)`` float32 HU slab for loader tests, any (also non-square) in-plane size.

    Same axes as :class:`Phantom` (x -> patient's left, y -> posterior): air outside an elliptic body
    (40 HU), two lungs (-850 HU), a vertebral body (700 HU) posterior and a dense marker (1500 HU) in the
    patient's left-anterior quadrant, so that flips and transpositions are visible. Every slice is the same
    plane plus a seeded per-slice offset (Gaussian, sigma 8 HU, not a whole number), deterministic in
    ``seed``. Use :func:`make_ct_phantom` for anatomy and findings.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx * columns) / (rx * columns)) ** 2 + ((y - cy * rows) / (ry * rows)) ** 2 <= 1

    plane = np.full((rows, columns), -1000.0, dtype=np.float32)
    plane[ellipse(0.5, 0.5, 0.42, 0.32)] = 40.0
    plane[ellipse(0.33, 0.47, 0.11, 0.17) | ellipse(0.67, 0.47, 0.11, 0.17)] = -850.0
    plane[ellipse(0.5, 0.72, 0.05, 0.05)] = 700.0
    plane[ellipse(0.62, 0.3, 0.03, 0.03)] = 1500.0
    volume = np.repeat(plane[None], n_slices, axis=0)
    volume += rng.normal(0.0, 8.0, size=(n_slices, 1, 1)).astype(np.float32)
    return volume


def write_nifti(
    phantom: Phantom,
    path: str | Path,
    *,
    dtype: str = "int16",
    rescale: tuple[float, float] | None = None,
    flip_x: bool = False,
    flip_y: bool = False,
    axcodes: Sequence[str] | None = None,
) -> Path:
    """Write the phantom as NIfTI (``.nii`` or ``.nii.gz``); see :func:`write_volume_nifti`."""
    return write_volume_nifti(
        phantom.hu,
        phantom.spacing,
        path,
        dtype=dtype,
        rescale=rescale,
        flip_x=flip_x,
        flip_y=flip_y,
        axcodes=axcodes,
    )


def write_volume_nifti(
    hu: np.ndarray,
    spacing: Sequence[float],
    path: str | Path,
    *,
    dtype: str = "int16",
    rescale: tuple[float, float] | None = None,
    flip_x: bool = False,
    flip_y: bool = False,
    axcodes: Sequence[str] | None = None,
) -> Path:
    """Write a HU volume ``(z, y, x)`` (LPS axes, see the module doc) as NIfTI-1.

    The NIfTI voxel array is ``(i, j, k) = (x, y, z)`` with an affine to RAS+ mm; without flips the
    voxel axes are L, P, S (``nibabel.aff2axcodes`` -> ``('L', 'P', 'S')``), the layout DICOM
    converters often produce. ``flip_x``/``flip_y`` store those axes reversed (affine adjusted), to
    exercise a loader's canonical reorientation: the physical image is the same.
    ``rescale=(slope, intercept)`` stores raw values with ``scl_slope``/``scl_inter`` set, so that a
    loader must apply them exactly once (HU = raw * slope + intercept).
    ``axcodes`` (e.g. ``("A", "R", "S")``, nibabel's codes) stores the voxel axes in any permutation and
    direction instead (not together with the flips). Integer ``dtype`` values are rounded; a float
    ``dtype`` (``"float32"``) stores them unrounded, NaN and infinity included.
    """
    path = Path(path)
    if hu.ndim != 3:
        raise SyntheticDataError(f"volume for {path} must be 3-D (z, y, x), got shape {hu.shape}")
    if axcodes is not None and (flip_x or flip_y):
        raise SyntheticDataError(f"{path}: give axcodes or flip_x/flip_y, not both")
    nz, ny, nx = hu.shape
    sz, sy, sx = (float(s) for s in spacing)
    x0, y0, z0 = -(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz  # LPS of voxel 0
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    raw = (hu - intercept) / slope if rescale is not None else hu
    if np.issubdtype(np.dtype(dtype), np.integer):
        raw = np.round(raw)
    data = np.ascontiguousarray(raw.transpose(2, 1, 0)).astype(dtype)  # (z,y,x) -> (i=x, j=y, k=z)
    # RAS = (-L, -P, S): x_ras = -(x0 + i*sx), y_ras = -(y0 + j*sy), z_ras = z0 + k*sz
    affine = np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0], [0, 0, 0, 1]], dtype=np.float64)
    if flip_x:
        data = data[::-1]
        affine[:, 3] = affine @ np.array([nx - 1, 0, 0, 1.0])
        affine[:, 0] *= -1
    if flip_y:
        data = data[:, ::-1]
        affine[:, 3] = affine @ np.array([0, ny - 1, 0, 1.0])
        affine[:, 1] *= -1
    zooms = (sx, sy, sz)
    if axcodes is not None:
        data, affine, zooms = _reorient(data, affine, tuple(axcodes), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_nifti1(np.ascontiguousarray(data), affine, zooms, (slope, intercept), path)
    return path


def _reorient(
    data_lps: np.ndarray, affine: np.ndarray, axcodes: tuple[str, ...], path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Voxel axes L, P, S -> ``axcodes``; the affine is adjusted so that every voxel keeps its position."""
    from nibabel import orientations

    axes = [i for code in axcodes for i, pair in enumerate(("LR", "PA", "SI")) if len(code) == 1 and code in pair]
    if len(axcodes) != 3 or sorted(axes) != [0, 1, 2]:
        raise SyntheticDataError(f"{path}: axcodes {axcodes} must name one of L/R, one of P/A, one of S/I")
    transform = orientations.ornt_transform(
        orientations.axcodes2ornt(("L", "P", "S")), orientations.axcodes2ornt(axcodes)
    )
    affine = affine @ orientations.inv_ornt_aff(transform, data_lps.shape)
    data = orientations.apply_orientation(data_lps, transform)
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return data, affine, zooms


def _save_nifti1(
    data_ijk: np.ndarray,
    affine: np.ndarray,
    zooms: tuple[float, float, float],
    slope_inter: tuple[float, float],
    path: Path,
) -> None:
    """Write a single-file NIfTI-1 with exactly this header (nibabel's writer would reset scl_slope
    for integer data) and a reproducible gzip stream (mtime 0): same input, same bytes."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(data_ijk.shape)
    header.set_data_dtype(data_ijk.dtype)
    header.set_zooms(zooms)
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header["scl_slope"], header["scl_inter"] = slope_inter
    header["vox_offset"] = 352
    payload = header.binaryblock + b"\x00" * 4 + data_ijk.tobytes(order="F")  # NIfTI: i varies fastest
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw:
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(payload)
    else:
        path.write_bytes(payload)


def write_dicom_series(phantom: Phantom, out_dir: str | Path, **options: Any):
    """Write the phantom as a DICOM CT series; options as :func:`dicom_writer.write_ct_series`."""
    from domain_data.synthetic.dicom_writer import write_ct_series

    options.setdefault("uid_seed", f"phantom-{phantom.seed}")
    return write_ct_series(phantom.hu, phantom.spacing, out_dir, **options)
