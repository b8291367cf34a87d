"""Fixtures for the medical tests: real pydicom/nibabel files turned into series, synthetic studies."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from domain_data.synthetic.dicom_writer import FakePatient

# written as PatientName, PatientID, PatientBirthDate, AccessionNumber and InstitutionName
FAKE_PATIENT = FakePatient(
    name="Doe^Janette",
    patient_id="PID-SECRET-4711",
    birth_date="19700101",
    accession="ACC-SECRET-99",
    institution="Secret General Hospital",
)


def identifier_strings() -> list[str]:
    return ["Doe", "Janette", "PID-SECRET-4711", "19700101", "ACC-SECRET-99", "Secret General Hospital"]


@pytest.fixture
def scratch_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Redirect tempfile to a folder we can inspect: loaders must leave it empty."""
    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def copy_as_series(source_name: str, folder: Path, count: int, spacing: float = 2.5,
                   modality: str | None = None, edit: Callable[[pydicom.Dataset, int], None] | None = None,
                   seed: int = 0) -> list[pydicom.Dataset]:
    """``count`` copies of a pydicom test file as one series: new UIDs, positions along the normal,
    shuffled file names and scrambled InstanceNumbers. Returns the datasets in true spatial order."""
    template = pydicom.dcmread(get_testdata_file(source_name))
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    rng = np.random.default_rng(seed)
    names = rng.permutation(count)
    numbers = rng.permutation(count) + 1
    orientation = np.asarray([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray([float(v) for v in template.ImagePositionPatient])
    written = []
    for k in range(count):
        dataset = pydicom.dcmread(get_testdata_file(source_name))
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = int(numbers[k])
        dataset.ImagePositionPatient = [round(float(v), 4) for v in origin + k * spacing * normal]
        if modality:
            dataset.Modality = modality
        if edit:
            edit(dataset, k)
        dataset.save_as(folder / f"slice_{int(names[k]):03d}.dcm")
        written.append(dataset)
    return written


@pytest.fixture
def copy_series() -> Callable[..., list[pydicom.Dataset]]:
    """:func:`copy_as_series` (test modules cannot import conftest under --import-mode=importlib)."""
    return copy_as_series


@pytest.fixture
def fake_identifiers() -> FakePatient:
    return FAKE_PATIENT


@pytest.fixture
def identifier_texts() -> list[str]:
    return identifier_strings()


@pytest.fixture
def testdata() -> Callable[[str], Path]:
    return lambda name: Path(get_testdata_file(name))


@pytest.fixture
def nibabel_data() -> Path:
    from nibabel.testing import data_path

    return Path(data_path)


def copy_file(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target
