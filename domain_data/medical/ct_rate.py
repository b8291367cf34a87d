"""CT-RATE: chest CT volumes, their radiology reports and the 18 multi-abnormality labels.

Layout (the Hugging Face release; ``root`` may be the folder holding ``dataset/`` or ``dataset/`` itself)::

    dataset/{train,valid}/{split}_{patient}/{split}_{patient}_{scan}/{split}_{patient}_{scan}_{recon}.nii.gz
    dataset/metadata/{train,validation}_metadata.csv            (RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing, ...)
    dataset/radiology_text_reports/{train,validation}_reports.csv  (VolumeName, ClinicalInformation_EN,
                                                                    Technique_EN, Findings_EN, Impressions_EN)
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv  (VolumeName + 18 columns)

Records are built from the CSVs (small); volumes are only read by :meth:`CTRateDataset.load_volume`.
Only the metadata columns needed to rescale (slope, intercept, spacing) are kept.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from domain_data.medical.constants import CT_RATE_ABNORMALITIES
from domain_data.medical.ct import CTVolume, load_ct
from domain_data.medical.errors import MedicalDatasetError

Split = Literal["train", "valid"]
_CSV_SPLIT = {"train": "train", "valid": "validation"}
METADATA_COLUMNS = ("RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")


@dataclass(frozen=True)
class CTRateRecord:
    """One CT-RATE volume with its report and labels (the volume itself is not loaded)."""

    volume_name: str  # e.g. valid_53_a_1.nii.gz
    split: str
    volume_path: Path
    findings: str
    impressions: str
    clinical_information: str = ""
    technique: str = ""
    labels: dict[str, int] = field(default_factory=dict)  # the 18 abnormalities, 0/1
    metadata_row: dict[str, str] = field(default_factory=dict)  # RescaleSlope/Intercept, XY/ZSpacing

    @property
    def report(self) -> str:
        return f"Findings: {self.findings}\nImpression: {self.impressions}".strip()


def volume_relative_path(volume_name: str, split: str) -> Path:
    """``valid_53_a_1.nii.gz`` -> ``valid/valid_53/valid_53_a/valid_53_a_1.nii.gz``."""
    stem = volume_name.removesuffix(".gz").removesuffix(".nii")
    parts = stem.split("_")
    if len(parts) < 4 or parts[0] != split:
        raise MedicalDatasetError(f"CT-RATE volume name {volume_name!r} does not follow "
                                  f"'{split}_<patient>_<scan>_<reconstruction>.nii.gz'")
    patient, scan = "_".join(parts[:2]), "_".join(parts[:3])
    return Path(split) / patient / scan / f"{stem}.nii.gz"


def _read_csv(path: Path, what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise MedicalDatasetError(f"CT-RATE {what} not found: {path}; download it from the CT-RATE release "
                                  "or point root at the folder holding dataset/")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "VolumeName" not in rows[0]:
        raise MedicalDatasetError(f"{path}: no VolumeName column; is this a CT-RATE {what}?")
    return rows


class CTRateDataset:
    """CT-RATE records of one split; ``labels`` / ``metadata`` CSVs are optional (``require_labels``)."""

    def __init__(self, root: str | Path, split: Split = "valid", require_labels: bool = True) -> None:
        if split not in _CSV_SPLIT:
            raise MedicalDatasetError(f"CT-RATE split {split!r}: use 'train' or 'valid'")
        root = Path(root)
        self.root = root / "dataset" if (root / "dataset").is_dir() else root
        if not self.root.is_dir():
            raise MedicalDatasetError(f"CT-RATE root not found: {root}")
        self.split = split
        csv_split = _CSV_SPLIT[split]
        reports = _read_csv(self.root / "radiology_text_reports" / f"{csv_split}_reports.csv", "reports CSV")
        labels_path = self.root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
        labels = (_read_csv(labels_path, "labels CSV") if require_labels or labels_path.exists() else [])
        metadata_path = self.root / "metadata" / f"{csv_split}_metadata.csv"
        metadata = _read_csv(metadata_path, "metadata CSV") if metadata_path.exists() else []
        self._labels = {row["VolumeName"]: self._label_row(row, labels_path) for row in labels}
        self._metadata = {row["VolumeName"]: {k: row[k] for k in METADATA_COLUMNS if k in row} for row in metadata}
        self._reports = reports

    @staticmethod
    def _label_row(row: dict[str, str], path: Path) -> dict[str, int]:
        missing = [name for name in CT_RATE_ABNORMALITIES if name not in row]
        if missing:
            raise MedicalDatasetError(f"{path}: missing label column(s) {missing}")
        return {name: int(float(row[name])) for name in CT_RATE_ABNORMALITIES}

    def __len__(self) -> int:
        return len(self._reports)

    def __getitem__(self, index: int) -> CTRateRecord:
        row = self._reports[index]
        name = row["VolumeName"]
        return CTRateRecord(
            volume_name=name,
            split=self.split,
            volume_path=self.root / volume_relative_path(name, self.split),
            findings=row.get("Findings_EN", "") or "",
            impressions=row.get("Impressions_EN", "") or "",
            clinical_information=row.get("ClinicalInformation_EN", "") or "",
            technique=row.get("Technique_EN", "") or "",
            labels=self._labels.get(name, {}),
            metadata_row=self._metadata.get(name, {}),
        )

    def __iter__(self) -> Iterator[CTRateRecord]:
        for index in range(len(self)):
            yield self[index]

    def load_volume(self, record: CTRateRecord, **kwargs: object) -> CTVolume:
        """The record's volume in HU, rescaled once with its metadata row (see :func:`load_ct`)."""
        if not record.volume_path.is_file():
            raise MedicalDatasetError(f"CT-RATE volume not found: {record.volume_path}")
        return load_ct(record.volume_path, ct_rate_metadata=record.metadata_row or None, **kwargs)
