"""CT-RATE, PubMedVision and closed-VQA readers on small files written here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from domain_data.medical.closed_vqa import ClosedVQADataset
from domain_data.medical.ct_rate import CTRateDataset, volume_relative_path
from domain_data.medical.errors import MedicalDatasetError
from domain_data.medical.metrics import CT_RATE_ABNORMALITIES
from domain_data.medical.pubmedvision import PubMedVisionDataset, insert_image_tokens
from domain_data.synthetic.ct_phantom import phantom_hu
from longllava.protocol import count_images, render_conversation


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _ct_rate(root: Path) -> np.ndarray:
    dataset = root / "dataset"
    hu = phantom_hu(6, 16, 16, seed=2).round()
    names = ["valid_53_a_1.nii.gz", "valid_53_a_2.nii.gz"]
    for name in names:
        path = dataset / volume_relative_path(name, "valid")
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = (hu + 1024).transpose(2, 1, 0).astype(np.int16)
        nib.save(nib.Nifti1Image(raw, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    _write_csv(dataset / "radiology_text_reports" / "validation_reports.csv", [
        {"VolumeName": n, "ClinicalInformation_EN": "cough", "Technique_EN": "non-contrast",
         "Findings_EN": f"Findings {i}.", "Impressions_EN": "Cardiomegaly."} for i, n in enumerate(names)])
    _write_csv(dataset / "metadata" / "validation_metadata.csv", [
        {"VolumeName": n, "RescaleSlope": "1", "RescaleIntercept": "-1024", "XYSpacing": "[0.7, 0.7]",
         "ZSpacing": "1.25", "PatientAge": "055Y"} for n in names])
    _write_csv(dataset / "multi_abnormality_labels" / "valid_predicted_labels.csv", [
        {"VolumeName": n, **{a: int(a == "Cardiomegaly") for a in CT_RATE_ABNORMALITIES}} for n in names])
    return hu


def test_ct_rate_records_and_volume(tmp_path: Path) -> None:
    hu = _ct_rate(tmp_path)
    dataset = CTRateDataset(tmp_path, split="valid")
    assert len(dataset) == 2
    record = dataset[0]
    assert record.volume_path == tmp_path / "dataset/valid/valid_53/valid_53_a/valid_53_a_1.nii.gz"
    assert record.labels["Cardiomegaly"] == 1 and sum(record.labels.values()) == 1
    assert record.findings == "Findings 0." and "Impression: Cardiomegaly." in record.report
    assert set(record.metadata_row) == {"RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"}
    volume = dataset.load_volume(record)
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing_mm == pytest.approx((1.25, 0.7, 0.7))


def test_ct_rate_missing_paths_named(tmp_path: Path) -> None:
    with pytest.raises(MedicalDatasetError, match="CT-RATE root not found"):
        CTRateDataset(tmp_path / "nope")
    _ct_rate(tmp_path)
    (tmp_path / "dataset/multi_abnormality_labels/valid_predicted_labels.csv").unlink()
    with pytest.raises(MedicalDatasetError, match="valid_predicted_labels.csv"):
        CTRateDataset(tmp_path, split="valid")
    dataset = CTRateDataset(tmp_path, split="valid", require_labels=False)
    record = dataset[1]
    record.volume_path.unlink()
    with pytest.raises(MedicalDatasetError, match="valid_53_a_2.nii.gz"):
        dataset.load_volume(record)
    with pytest.raises(MedicalDatasetError, match="does not follow"):
        volume_relative_path("train_1.nii.gz", "train")


def _pubmedvision(root: Path, rows: list[dict]) -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(root / "images" / name)
    path = root / "PubMedVision_Alignment_VQA.json"
    path.write_text(json.dumps(rows))
    return path


def test_pubmedvision_inserts_one_image_token_per_image(tmp_path: Path) -> None:
    rows = [{"id": "x1", "image": ["images/a.jpg", "images/b.jpg"], "body_part": "Chest", "modality": "CT",
             "conversations": [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "Lungs."}]}]
    dataset = PubMedVisionDataset(_pubmedvision(tmp_path, rows))
    record = dataset[0]
    assert record.conversations[0]["value"] == "<image>\n<image>\nWhat is shown?"
    assert count_images(record.conversations[0]["value"]) == 2
    assert [m["role"] for m in record.messages()] == ["user", "assistant"]
    assert render_conversation(record.messages())[-1].text == "Lungs.<|endoftext|>"
    assert len(record.open_images()) == 2
    assert rows[0]["conversations"][0]["value"] == "What is shown?"  # the source rows are not modified


def test_pubmedvision_errors(tmp_path: Path) -> None:
    with pytest.raises(MedicalDatasetError, match="not found: .*missing.json"):
        PubMedVisionDataset(tmp_path / "missing.json", image_root=tmp_path)
    with pytest.raises(MedicalDatasetError, match="1 <image> token"):
        insert_image_tokens([{"from": "human", "value": "<image> hi"}], 2, "r")
    rows = [{"id": "x2", "image": ["images/zzz.jpg"], "conversations": [{"from": "human", "value": "q"}]}]
    record = PubMedVisionDataset(_pubmedvision(tmp_path, rows))[0]
    with pytest.raises(MedicalDatasetError, match="zzz.jpg"):
        record.open_images()


def test_closed_vqa_formats(tmp_path: Path) -> None:
    huatuo = [{"question": "Which organ?", "options": ["liver", "lung"], "answer": "B", "image": ["i.jpg"],
               "dataset": "SLAKE"}]
    (tmp_path / "huatuo.json").write_text(json.dumps(huatuo))
    record = ClosedVQADataset(tmp_path / "huatuo.json")[0]
    assert record.answer == "lung" and record.answer_index == 1 and record.dataset == "SLAKE"
    assert "A. liver\nB. lung" in record.prompt()
    raw = [
        {"qid": 1, "image_name": "s.jpg", "question": "Is there a fracture?", "answer": "Yes", "answer_type": "CLOSED"},
        {"qid": 2, "image_name": "s.jpg", "question": "Is the lesion in the left or right lung?",
         "answer": "right", "answer_type": "CLOSED"},
        {"qid": 3, "image_name": "s.jpg", "question": "What organ?", "answer": "liver", "answer_type": "OPEN"},
        {"qid": 4, "image_name": "s.jpg", "question": "How many lesions are closed?", "answer": "2",
         "answer_type": "CLOSED"},
    ]
    (tmp_path / "vqa_rad.json").write_text(json.dumps(raw))
    dataset = ClosedVQADataset(tmp_path / "vqa_rad.json", dataset="VQA-RAD")
    assert [r.question_id for r in dataset] == ["1", "2"] and dataset.skipped == 1
    assert dataset[0].options == ("yes", "no") and dataset[0].answer == "yes"
    assert dataset[1].options == ("left", "right") and dataset[1].answer == "right"
    with pytest.raises(MedicalDatasetError, match="closed-VQA file not found"):
        ClosedVQADataset(tmp_path / "nothing.json")
