"""The medical datasets in one place (each lives in its own module)."""

from domain_data.medical.closed_vqa import ClosedVQADataset, ClosedVQARecord
from domain_data.medical.ct_rate import CTRateDataset, CTRateRecord, volume_relative_path
from domain_data.medical.pubmedvision import PubMedVisionDataset, PubMedVisionRecord, insert_image_tokens

__all__ = [
    "CTRateDataset",
    "CTRateRecord",
    "ClosedVQADataset",
    "ClosedVQARecord",
    "PubMedVisionDataset",
    "PubMedVisionRecord",
    "insert_image_tokens",
    "volume_relative_path",
]
