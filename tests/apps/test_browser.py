"""End-to-end tests in headless Chromium against a live ``longllava app`` (tiny random model).

Each flow saves a screenshot under ``artifacts/apps/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

LOAD_TIMEOUT_MS = 90_000


def expect():
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def upload(page, element_id: str, paths: list[Path]) -> None:
    page.locator(f"#{element_id} input[type=file]").set_input_files([str(p) for p in paths])


def ask(page, prefix: str, question: str) -> None:
    page.locator(f"#{prefix}-question textarea").fill(question)
    page.locator(f"#{prefix}-ask").click()
    expect()(page.locator(f"#{prefix}-chat-status")).to_contain_text("Answered in", timeout=LOAD_TIMEOUT_MS)


def bot_messages(page, prefix: str):
    return page.locator(f"#{prefix}-chat .message.bot")


def test_ct_upload_ask_answer(page, study_files, artifacts_dir: Path) -> None:
    upload(page, "ct-upload", [study_files.nifti])
    status = page.locator("#ct-status")
    expect()(status).to_contain_text("Study loaded", timeout=LOAD_TIMEOUT_MS)
    expect()(status).to_contain_text("4 slices ready for the model")
    summary = page.locator("#ct-summary")
    expect()(summary).to_contain_text("slices: 16")
    expect()(page.locator("#ct-view img")).to_be_visible()
    expect()(page.locator("#ct-montage img")).to_be_visible()

    page.get_by_label("mediastinum").check()
    ask(page, "ct", "Is there a pleural effusion?")
    expect()(bot_messages(page, "ct")).to_have_count(1)
    assert bot_messages(page, "ct").first.inner_text().strip(), "the answer bubble is empty"
    page.screenshot(path=str(artifacts_dir / "ct_flow.png"), full_page=True)


def test_ct_bad_file_then_good_file(page, study_files, artifacts_dir: Path) -> None:
    page.locator("#ct-question textarea").fill("Anything abnormal?")
    page.locator("#ct-ask").click()
    expect()(page.locator("#ct-chat-status")).to_contain_text("Error: no study loaded yet", timeout=LOAD_TIMEOUT_MS)
    upload(page, "ct-upload", [study_files.bad_file])
    status = page.locator("#ct-status")
    expect()(status).to_contain_text("Error:", timeout=LOAD_TIMEOUT_MS)
    text = status.inner_text()
    assert "broken_study.nii.gz" in text, text
    assert "Traceback" not in page.content()
    page.screenshot(path=str(artifacts_dir / "ct_bad_file.png"), full_page=True)

    page.locator("#ct-upload button[aria-label='Clear']").first.click()
    upload(page, "ct-upload", [study_files.nifti])
    expect()(status).to_contain_text("Study loaded", timeout=LOAD_TIMEOUT_MS)
    ask(page, "ct", "How many nodules are there?")
    expect()(bot_messages(page, "ct")).to_have_count(1)


def test_ct_dicom_identifiers_never_shown(page, app_server, study_files, identifiers: set[str],
                                          artifacts_dir: Path, tmp_path: Path) -> None:
    upload(page, "ct-upload", study_files.dicom_files)
    expect()(page.locator("#ct-status")).to_contain_text("Study loaded", timeout=LOAD_TIMEOUT_MS)
    ask(page, "ct", "Describe the lungs.")
    page.locator("#ct-findings-btn").click()
    expect()(page.locator("#ct-chat-status")).to_contain_text("Findings checklist done", timeout=LOAD_TIMEOUT_MS)
    expect()(page.locator("#ct-findings")).to_contain_text("Lung nodule")
    page.locator("#ct-export-btn").click()
    expect()(page.locator("#ct-chat-status")).to_contain_text("Exported", timeout=LOAD_TIMEOUT_MS)
    links = page.locator("#ct-exports a")
    expect()(links).to_have_count(2)
    exported: dict[str, str] = {}
    for index in range(2):
        with page.expect_download() as info:
            links.nth(index).click()
        download = info.value
        target = tmp_path / download.suggested_filename
        download.save_as(target)
        exported[target.suffix] = target.read_text(encoding="utf-8")
    payload = json.loads(exported[".json"])
    assert payload["study"]["slices"] == 16
    assert len(payload["conversation"]) == 1 and len(payload["findings"]) == 18
    assert "## Findings checklist" in exported[".md"]
    page.screenshot(path=str(artifacts_dir / "ct_dicom_privacy.png"), full_page=True)

    surfaces = {"page": page.content() + page.inner_text("body"), "server log": app_server.log_text(),
                **{f"export {suffix}": text for suffix, text in exported.items()}}
    for where, text in surfaces.items():
        for variant in identifiers:
            assert variant.lower() not in text.lower(), f"identifier {variant!r} appears in the {where}"


def test_satellite_overlay_and_geojson(page, raster_file: Path, artifacts_dir: Path,
                                       tmp_path: Path) -> None:
    page.get_by_role("tab", name="Satellite image").click()
    upload(page, "rs-upload", [raster_file])
    status = page.locator("#rs-status")
    expect()(status).to_contain_text("Image loaded", timeout=LOAD_TIMEOUT_MS)
    expect()(page.locator("#rs-info")).to_contain_text("tiles")
    overlay = page.locator("#rs-overlay img")
    expect()(overlay).to_be_visible()
    ask(page, "rs", "Which tiles contain ships?")
    expect()(bot_messages(page, "rs")).to_have_count(1)
    link = page.locator("#rs-geojson a").first
    expect()(link).to_be_visible()
    with page.expect_download() as info:
        link.click()
    target = tmp_path / "answer.geojson"
    info.value.save_as(target)
    collection = json.loads(target.read_text(encoding="utf-8"))
    assert collection["type"] == "FeatureCollection"
    assert isinstance(collection["features"], list)
    page.screenshot(path=str(artifacts_dir / "satellite_flow.png"), full_page=True)


def test_sample_buttons(page, artifacts_dir: Path) -> None:
    page.locator("#ct-sample").click()
    expect()(page.locator("#ct-status")).to_contain_text("Sample study loaded", timeout=LOAD_TIMEOUT_MS)
    page.get_by_role("tab", name="Satellite image").click()
    page.locator("#rs-sample").click()
    expect()(page.locator("#rs-status")).to_contain_text("Sample image loaded", timeout=LOAD_TIMEOUT_MS)
    page.screenshot(path=str(artifacts_dir / "satellite_sample.png"), full_page=True)


def test_upload_over_the_size_limit_is_refused(page, study_files, tmp_path: Path) -> None:
    huge = tmp_path / "huge_study.nii.gz"
    with huge.open("wb") as handle:  # the test server's limit is 20 MB
        handle.truncate(21 * 1024 * 1024)
    upload(page, "ct-upload", [huge])
    expect()(page.get_by_text("exceed the maximum allowed size")).to_be_visible(timeout=LOAD_TIMEOUT_MS)
    upload(page, "ct-upload", [study_files.nifti])
    expect()(page.locator("#ct-status")).to_contain_text("Study loaded", timeout=LOAD_TIMEOUT_MS)


def test_preloaded_samples_are_ready_to_ask(browser, app_server_factory, artifacts_dir: Path) -> None:
    server = app_server_factory("--preload-samples")
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.goto(server.url)
    expect()(page.locator("#ct-status")).to_contain_text("Sample study loaded", timeout=LOAD_TIMEOUT_MS)
    ask(page, "ct", "Is there a lung nodule?")
    page.get_by_role("tab", name="Satellite image").click()
    expect()(page.locator("#rs-status")).to_contain_text("Sample image loaded", timeout=LOAD_TIMEOUT_MS)
    ask(page, "rs", "How many ships are there?")
    page.screenshot(path=str(artifacts_dir / "satellite_preloaded.png"), full_page=True)
    context.close()
