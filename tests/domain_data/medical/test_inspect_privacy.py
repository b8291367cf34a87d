"""`longllava inspect --ct` and privacy: identifiers never reach metadata, reports, errors, logs or files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
import pytest

from domain_data.medical.ct import load_ct
from domain_data.medical.errors import CTInputError
from domain_data.medical.inspect import format_ct_report, inspect_ct
from domain_data.medical.slices import ct_to_slices, montage
from domain_data.synthetic.ct_phantom import phantom_hu
from domain_data.synthetic.dicom_writer import FakePatient, write_ct_series
from longllava.cli import main as cli_main


def _assert_clean(text: str, secrets: list[str]) -> None:
    lowered = text.lower()
    leaked = [s for s in secrets if s.lower() in lowered]
    assert not leaked, f"identifiers leaked: {leaked}"


def _identified_series(folder: Path, patient: FakePatient, modality: str = "CT") -> Path:
    series = write_ct_series(phantom_hu(8, 24, 24), (2.0, 0.7, 0.7), folder, patient=patient, modality=modality,
                             file_prefix="Doe_Janette_", series_description="Secret General Hospital CHEST")
    written = pydicom.dcmread(series.paths[0])  # the identifiers really are in the files
    assert (str(written.PatientName), written.PatientID, written.PatientBirthDate, written.AccessionNumber,
            written.InstitutionName) == patient.identifiers()
    return folder


def test_loaded_metadata_and_reports_have_no_identifiers(tmp_path: Path, fake_identifiers: FakePatient,
                                                         identifier_texts: list[str],
                                                         caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    folder = _identified_series(tmp_path / "study", fake_identifiers)
    volume = load_ct(folder)
    _assert_clean(json.dumps(volume.metadata, default=str), identifier_texts)
    assert volume.metadata["series_description"] == "[redacted] CHEST"
    report = inspect_ct(folder)
    _assert_clean(json.dumps(report) + format_ct_report(report), identifier_texts)
    assert cli_main(["inspect", "--ct", str(folder), "--json"]) == 0
    assert cli_main(["inspect", "--ct", str(folder)]) == 0
    out = capsys.readouterr()
    _assert_clean(out.out + out.err, identifier_texts)
    assert json.loads(out.out.split("\nCT study:")[0])["slices"] == 8
    sheet = tmp_path / "montage.png"
    montage(ct_to_slices(volume, num_slices=8, size=32)).save(sheet)
    _assert_clean(sheet.read_bytes().decode("latin-1"), identifier_texts)
    _assert_clean("\n".join(r.getMessage() for r in caplog.records), identifier_texts)


def test_errors_have_no_identifiers(tmp_path: Path, fake_identifiers: FakePatient, identifier_texts: list[str],
                                    capsys: pytest.CaptureFixture) -> None:
    folder = _identified_series(tmp_path / "Doe_Janette_upload", fake_identifiers, modality="MR")
    with pytest.raises(CTInputError) as caught:
        load_ct(folder)
    _assert_clean(str(caught.value), identifier_texts)
    assert "found: MR" in str(caught.value)
    with pytest.raises(CTInputError) as caught:  # unknown series: the message lists what was found
        load_ct(folder, series_uid="1.2.3")
    _assert_clean(str(caught.value), identifier_texts)
    assert cli_main(["inspect", "--ct", str(folder)]) == 2
    _assert_clean(capsys.readouterr().err, identifier_texts)


def test_real_pydicom_identifiers_not_reported(copy_series, tmp_path: Path) -> None:
    copy_series("CT_small.dcm", tmp_path / "s", 3)  # PatientName CompressedSamples^CT1, JFK IMAGING CENTER
    report = inspect_ct(tmp_path / "s")
    _assert_clean(json.dumps(report) + format_ct_report(report), ["CompressedSamples", "1CT1", "JFK IMAGING"])


def test_inspect_report_content(copy_series, tmp_path: Path) -> None:
    copy_series("CT_small.dcm", tmp_path / "s", 3, spacing=5.0)
    report = inspect_ct(tmp_path / "s")
    assert report["slices"] == 3 and report["shape_zyx"] == [3, 128, 128]
    assert report["spacing_mm_zyx"][0] == 5.0
    assert report["model_slices"] == 100 and report["windows"]["lung"] == {"width": 1500, "level": -600}
    assert report["hu_range"][0] < report["hu_range"][1]
    text = format_ct_report(report)
    assert "model input: 100 slices" in text and "lung W1500/L-600" in text
