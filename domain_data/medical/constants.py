"""CT-RATE constants shared by the dataset reader and the metrics (no heavy imports)."""

from __future__ import annotations

# The 18 multi-abnormality label columns of CT-RATE, exact spelling and order of the release.
CT_RATE_ABNORMALITIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)


# The report answer the suite trains on and scores (CT-RATE's findings and impressions text fields).
REPORT_FINDINGS_PREFIX = "Findings: "


def report_answer(findings: str, impressions: str) -> str:
    """``Findings: ...`` newline ``Impressions: ...``: one CT report as a training / reference answer."""
    return f"{REPORT_FINDINGS_PREFIX}{findings}\nImpressions: {impressions}"
