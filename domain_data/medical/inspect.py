"""``longllava inspect --ct PATH``: what a CT study loads as (never any patient identifier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domain_data.medical.ct import load_ct
from domain_data.medical.slices import choose_slice_count
from domain_data.medical.windows import MULTI_WINDOW_CHANNELS, WINDOWS


def inspect_ct(path: str | Path, series_uid: str | None = None) -> dict:
    """Load the study like the app does and describe it as a JSON-able dict.

    Raises :class:`~domain_data.medical.errors.CTInputError` when the study cannot be loaded.
    """
    volume = load_ct(path, series_uid=series_uid)
    hu = volume.hu
    sample = hu[:, ::2, ::2]
    percentiles = np.percentile(sample, [1, 50, 99])
    model_slices, reason = choose_slice_count(volume, None, None)
    meta = volume.metadata
    return {
        "path": str(path),
        "source_kind": meta.get("source_kind"),
        "modality": meta.get("modality"),
        "series_description": meta.get("series_description", ""),
        "series_uid": meta.get("series_uid"),
        "other_series": meta.get("other_series", []),
        "slices": volume.num_slices,
        "shape_zyx": list(volume.shape),
        "spacing_mm_zyx": [round(float(s), 4) for s in volume.spacing_mm],
        "extent_mm_z": round(float(volume.z_offsets_mm[-1] - volume.z_offsets_mm[0]), 2),
        "orientation": f"{volume.orientation} (hu[z, y, x]: x -> Left, y -> Posterior, z -> Superior)",
        "original_orientation": meta.get("original_orientation"),
        "hu_range": [round(float(hu.min()), 1), round(float(hu.max()), 1)],
        "hu_percentiles_1_50_99": [round(float(p), 1) for p in percentiles],
        "windows": {name: {"width": w.width, "level": w.level} for name, w in WINDOWS.items()},
        "multi_window_channels": list(MULTI_WINDOW_CHANNELS),
        "model_slices": model_slices,
        "model_slices_reason": reason,
        "dropped_localizers": meta.get("dropped_localizers", 0),
        "skipped_non_dicom_files": meta.get("skipped_non_dicom_files", 0),
        "transfer_syntaxes": meta.get("transfer_syntaxes", []),
        "uneven_spacing": meta.get("uneven_spacing"),
        "warnings": list(meta.get("warnings", [])),
    }


def format_ct_report(report: dict) -> str:
    """Human-readable lines for :func:`inspect_ct`'s report."""
    z, y, x = report["spacing_mm_zyx"]
    lines = [
        f"CT study: {report['path']}",
        f"  source: {report['source_kind']}, modality {report['modality']}",
    ]
    if report.get("series_uid"):
        description = f" ({report['series_description']})" if report.get("series_description") else ""
        lines.append(f"  series chosen: {report['series_uid']}{description}")
    for other in report.get("other_series", []):
        lines.append(f"  other series: {other['series_uid']} {other['modality']} {other['files']} files "
                     f"{other.get('description', '')}".rstrip())
    lines += [
        f"  slices: {report['slices']}  shape (z, y, x): {tuple(report['shape_zyx'])}",
        f"  spacing (z, y, x) mm: {z:g}, {y:g}, {x:g}  z extent: {report['extent_mm_z']} mm",
        f"  orientation: {report['orientation']}; stored as {report['original_orientation']}",
        f"  HU range: {report['hu_range'][0]} .. {report['hu_range'][1]}  "
        f"(1/50/99 %: {', '.join(str(v) for v in report['hu_percentiles_1_50_99'])})",
        "  windows: " + ", ".join(f"{n} W{w['width']:g}/L{w['level']:g}" for n, w in report["windows"].items())
        + f"; multi = {'/'.join(report['multi_window_channels'])} as RGB",
        f"  model input: {report['model_slices']} slices ({report['model_slices_reason']})",
    ]
    if report.get("dropped_localizers"):
        lines.append(f"  dropped localizer/odd slices: {report['dropped_localizers']}")
    if report.get("skipped_non_dicom_files"):
        lines.append(f"  skipped non-DICOM files: {report['skipped_non_dicom_files']}")
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
