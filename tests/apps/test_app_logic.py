"""App logic without a browser: loading, privacy, limits, error messages, overlay, exports, auth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from apps.common import (
    AppConfig,
    AppInputError,
    check_upload_size,
    error_markdown,
    guarded,
    resolve_auth,
    strip_upload_dirs,
)
from domain_data.medical.errors import CTInputError
from longllava.errors import UserInputError
from longllava.protocol import grid_prompt


@pytest.fixture()
def config(tmp_path: Path) -> AppConfig:
    return AppConfig(num_slices=4, max_tiles=4, max_new_tokens=8, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- CT


def test_dicom_files_and_zip_load_with_capped_slices_and_no_identifiers(study_files, identifiers, config) -> None:
    from apps.ct_app import export_markdown, export_payload, load_study, summary_markdown

    for upload in (study_files.dicom_files, [study_files.dicom_zip]):
        study = load_study(list(upload), config, slice_size=56)
        assert len(study.model_slices) == 4
        assert study.visual_prompt.count("<image>") == 4
        assert study.summary["slices"] == 16 and study.summary["modality"] == "CT"
        assert study.viewer_hu.dtype == np.int16 and study.viewer_hu.shape == (16, 64, 64)
        study.turns.append(("Any nodule?", "No."))
        payload = export_payload(study, "tiny")
        shown = summary_markdown(study) + json.dumps(payload) + export_markdown(payload)
        for variant in identifiers:
            assert variant.lower() not in shown.lower(), variant
        assert "series_uid" not in shown


def test_status_names_what_the_model_is_fed(study_files, config) -> None:
    from dataclasses import replace

    from apps.ct_app import load_study

    assert load_study([study_files.nifti], config, slice_size=56).model_images() == "4 slices"
    slabs = load_study([study_files.nifti], replace(config, window="slab"), slice_size=56)
    assert slabs.model_images() == "4 slabs" and "slab" in slabs.summary["slices_for_model_note"]


def test_viewer_windows_and_montage(study_files, config) -> None:
    from apps.ct_app import load_study, montage_view, slice_view

    study = load_study([study_files.nifti], config, slice_size=56)
    lung, mediastinum = slice_view(study, 8, "lung"), slice_view(study, 8, "mediastinum")
    assert lung.size == mediastinum.size and min(lung.size) >= 320
    assert np.asarray(lung).mean() != np.asarray(mediastinum).mean()
    assert slice_view(study, 999, "bone").size == lung.size  # index clamped to the last slice
    with pytest.raises(AppInputError, match="unknown window"):
        slice_view(study, 0, "brain")
    assert montage_view(study, "lung").size == (4 * 160, 4 * 160)


def test_findings_checklist_parses_all_18(config) -> None:
    from apps.ct_app import findings_question, findings_table

    assert findings_question() == "Write the findings and impressions of this chest CT."
    table = findings_table("Lung nodule: yes\nCardiomegaly: no\nThere is a small pleural effusion.")
    assert len(table) == 18
    assert table["Lung nodule"] == "present" and table["Pleural effusion"] == "present"
    assert table["Cardiomegaly"] == "not found" and table["Emphysema"] == "not found"


def test_model_messages_put_the_series_in_the_first_turn_only(study_files, config) -> None:
    from apps.ct_app import load_study, model_messages

    study = load_study([study_files.nifti], config, slice_size=56)
    first = model_messages(study, "Q1")
    assert first == [{"role": "user", "content": f"{study.visual_prompt}\nQ1"}]
    study.turns.append(("Q1", "A1"))
    second = model_messages(study, "Q2")
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[2]["content"] == "Q2" and sum(m["content"].count("<image>") for m in second) == 4


def test_upload_limit_and_empty_upload(study_files, config) -> None:
    from apps.ct_app import load_study

    config.max_upload_mb = 0.001
    with pytest.raises(AppInputError, match="over this app's limit"):
        load_study([study_files.nifti], config, slice_size=56)
    with pytest.raises(AppInputError, match="no file uploaded"):
        load_study([], config, slice_size=56)
    check_upload_size([study_files.bad_file], max_mb=1.0)  # small files pass
    config.max_upload_mb = 100
    with pytest.raises(AppInputError, match="one NIfTI file or one .zip at a time"):
        load_study([study_files.nifti, *study_files.other_niftis[:1]], config, slice_size=56)


# ----------------------------------------------------------------------------- errors


def test_guarded_handlers_turn_errors_into_messages() -> None:
    import gradio as gr

    @guarded("test", n_outputs=3, status_index=1)
    def fails_for_user(path: str) -> tuple:
        raise CTInputError(f"{path}: truncated gzip stream; re-export the volume")

    @guarded("test", n_outputs=2, status_index=0)
    def fails_inside() -> tuple:
        raise RuntimeError("shape mismatch in layer 3")

    @guarded("test", n_outputs=2, status_index=1)
    def streams_then_fails():
        yield "partial", "working"
        raise CTInputError("bad slice")

    first, status, third = fails_for_user("/tmp/gradio/0123456789abcdef0123/My Scan.nii.gz")
    assert status == "**Error:** My Scan.nii.gz: truncated gzip stream; re-export the volume"
    assert isinstance(first, type(gr.skip())) and isinstance(third, type(gr.skip()))
    status, _ = fails_inside()
    assert status.startswith("**Internal error** (RuntimeError)") and "shape mismatch" not in status
    assert list(streams_then_fails())[-1][1] == "**Error:** bad slice"


def test_error_markdown_and_paths() -> None:
    assert error_markdown(UserInputError("x.zip: not a zip")) == "**Error:** x.zip: not a zip"
    assert strip_upload_dirs("/srv/a/b/scan.dcm and '/tmp/x/y.zip'") == "scan.dcm and 'y.zip'"
    assert strip_upload_dirs("member 'a/../b' at 3/4") == "member 'a/../b' at 3/4"


# ----------------------------------------------------------------------------- serving


def test_auth_is_required_off_loopback(monkeypatch) -> None:
    monkeypatch.delenv("LONGLLAVA_APP_USER", raising=False)
    monkeypatch.delenv("LONGLLAVA_APP_PASSWORD", raising=False)
    assert resolve_auth("127.0.0.1") is None
    with pytest.raises(AppInputError, match="LONGLLAVA_APP_USER"):
        resolve_auth("0.0.0.0")
    monkeypatch.setenv("LONGLLAVA_APP_USER", "analyst")
    with pytest.raises(AppInputError, match="only one"):
        resolve_auth("0.0.0.0")
    monkeypatch.setenv("LONGLLAVA_APP_PASSWORD", "s3cret")
    assert resolve_auth("0.0.0.0") == ("analyst", "s3cret")


def test_cli_refuses_public_address_without_login(monkeypatch, capsys, tmp_path: Path) -> None:
    from longllava.cli import main

    monkeypatch.delenv("LONGLLAVA_APP_USER", raising=False)
    monkeypatch.delenv("LONGLLAVA_APP_PASSWORD", raising=False)
    code = main(["app", "--model", str(tmp_path / "missing"), "--host", "0.0.0.0"])
    assert code == 2
    assert "refusing to serve on 0.0.0.0 without a login" in capsys.readouterr().err
    assert main(["app", "ct", "--model", "m", "--concurrency", "0"]) == 2


def test_build_app_both_tabs_one_model_and_queue(tiny_model_dir: Path, config) -> None:
    import inspect

    import gradio as gr

    from apps.engine import load_shared_model
    from apps.launcher import build_app

    shared = load_shared_model(str(tiny_model_dir))
    config.concurrency_limit, config.queue_max_size = 3, 7
    app = build_app(shared, config)
    labels = {getattr(block, "label", None) for block in app.blocks.values()}
    assert {"CT study", "Satellite image"} <= labels
    assert app._queue.default_concurrency_limit == 3 and app._queue.max_size == 7
    by_name = {dep.api_name: dep for dep in app.fns.values()}
    assert {"ct_upload", "ct_ask", "ct_findings", "ct_export", "rs_upload", "rs_ask"} <= set(by_name)
    for name in ("ct_ask", "ct_findings", "rs_ask"):  # one model-call limit across both tabs
        assert (by_name[name].concurrency_id, by_name[name].concurrency_limit) == ("model", 3)
    for name in ("ct_upload", "ct_ask", "ct_findings", "rs_upload", "rs_ask"):  # Gradio injects a tracker
        fn = by_name[name].fn
        assert isinstance(inspect.signature(fn).parameters["progress"].default, gr.Progress), name
    assert inspect.isgeneratorfunction(by_name["ct_ask"].fn)  # streamed
    with pytest.raises(AppInputError, match="unknown app"):
        build_app(shared, config, kinds=("mri",))


def test_model_card_notice_is_the_cards_first_paragraph_and_shown_on_the_page(tiny_model_dir: Path, tmp_path,
                                                                              config) -> None:
    import shutil

    from apps.engine import load_shared_model, model_card_notice
    from apps.launcher import build_app
    from longllava.loading import DEMO_DIR

    assert model_card_notice(tiny_model_dir) == ""  # no card, no notice
    assert load_shared_model(str(tiny_model_dir)).notice == ""
    with_card = tmp_path / "carded"
    shutil.copytree(tiny_model_dir, with_card)
    (with_card / "MODEL_CARD.md").write_text("# Title\n\n**Toy model.** Knows only\nflat colours.\n\nSecond part.\n")
    assert model_card_notice(with_card) == "**Toy model.** Knows only flat colours."
    shared = load_shared_model(str(with_card))
    assert shared.notice == "**Toy model.** Knows only flat colours."
    app = build_app(shared, config)
    shown = [b.value for b in app.blocks.values() if getattr(b, "elem_id", None) == "model-notice"]
    assert shown == ["**About this model** (from its model card): **Toy model.** Knows only flat colours."]
    demo_notice = model_card_notice(DEMO_DIR)  # the bundled model says what it is not
    assert "only synthetic data" in demo_notice and "not a medical device" in demo_notice


# ----------------------------------------------------------------------------- satellite


def test_referenced_tiles_are_highlighted_and_exported(raster_file: Path, config) -> None:
    from apps.rs_app import draw_overlay, geojson_export, load_image, referenced_tiles

    image = load_image([raster_file], config, tile_size=56)
    assert image.grid == (2, 2) and len(image.model_images()) == 5
    assert image.tiled.prompt == grid_prompt(2, 2)  # tiles labelled only for a model trained with labels
    labelled = load_image([raster_file], dataclasses.replace(config, tile_labels=True), tile_size=56)
    assert labelled.tiled.prompt == grid_prompt(2, 2, tile_labels=True)
    answer = "The bright squares are in row 1, column 2."
    image.referenced = referenced_tiles(answer, image)
    assert image.referenced == [(0, 1)]
    plain = np.asarray(draw_overlay(image)).astype(int)
    marked = np.asarray(draw_overlay(image, image.referenced)).astype(int)
    cell = image.cell
    centre_hit = marked[cell // 2, cell + cell // 2] - plain[cell // 2, cell + cell // 2]
    assert centre_hit[0] > 20 and centre_hit[1] < 0  # redder inside the referenced tile
    assert np.array_equal(marked[cell + cell // 2, cell // 2], plain[cell + cell // 2, cell // 2])
    path, count = geojson_export(answer, image, config)
    collection = json.loads(Path(path).read_text())
    assert count == 1 and collection["features"][0]["properties"]["tile_row"] == 1
    assert collection["features"][0]["properties"]["tile_col"] == 2
    lon, lat = collection["features"][0]["geometry"]["coordinates"][0][0]
    assert 10 < lon < 20 and 35 < lat < 40  # UTM 33N near (500 km E, 4200 km N)


def test_raster_upload_errors(tmp_path: Path, raster_file: Path, config) -> None:
    from apps.rs_app import load_image

    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(UserInputError):
        load_image([text_file], config, tile_size=56)
    with pytest.raises(AppInputError, match="one image at a time"):
        load_image([raster_file, raster_file], config, tile_size=56)


def test_samples_are_generated_once(tmp_path: Path) -> None:
    from apps.samples import sample_ct_study, sample_raster, sample_truth

    ct = sample_ct_study(tmp_path)
    raster = sample_raster(tmp_path)
    assert ct.name.endswith(".nii.gz") and raster.suffix == ".tif"
    stamp = ct.stat().st_mtime_ns, raster.stat().st_mtime_ns
    assert (sample_ct_study(tmp_path).stat().st_mtime_ns, sample_raster(tmp_path).stat().st_mtime_ns) == stamp
    assert not list(tmp_path.glob("partial-*"))
    assert sample_truth(ct).startswith("rendered findings: ") and "Lung nodule" in sample_truth(ct)
    assert sample_truth(raster).startswith("objects (336-px tiles") and "row " in sample_truth(raster)
    assert sample_truth(tmp_path / "elsewhere.nii.gz") == ""


def test_old_exports_are_removed(config) -> None:
    import os
    import time

    from apps.common import write_export

    old = write_export(config, "old", ".json", "{}")
    past = time.time() - 2 * 24 * 3600
    os.utime(old.parent, (past, past))
    new = write_export(config, "new", ".json", "{}")
    assert new.is_file() and not old.exists()


def test_streamed_answer_matches_plain_generate_and_reports_progress(tiny_model_dir: Path) -> None:
    """The apps' answer path (long-context session, streamed) equals transformers' greedy generate."""
    import torch
    from PIL import Image

    from apps.engine import load_shared_model, stream_answer
    from longllava.protocol import render_prompt, series_prompt

    shared = load_shared_model(str(tiny_model_dir))
    images = [Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)) for i in range(5)]
    messages = [{"role": "user", "content": f"{series_prompt(5)}\nWhat is shown?"}]
    calls: list[tuple[int, int, str]] = []
    pieces = list(stream_answer(shared, messages, images, 12, progress=lambda *call: calls.append(call)))

    inputs = shared.processor(text=render_prompt(messages), images=images, return_tensors="pt")
    with torch.inference_mode():
        output = shared.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = shared.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # streamed piece by piece
    assert calls[0][1] == 5 and any(done == total == 5 for done, total, _ in calls)  # image encoding reported


def test_second_question_about_a_study_reuses_its_encoded_images(tiny_model_dir: Path, monkeypatch) -> None:
    """With a cache key the vision tower runs once per study; answers equal the uncached path."""
    from PIL import Image

    from apps.engine import load_shared_model, stream_answer
    from longllava.protocol import series_prompt
    from longllava.session import LongContextSession

    shared = load_shared_model(str(tiny_model_dir))
    images = [Image.new("RGB", (64, 64), (30 * i, 120, 90)) for i in range(4)]
    encoded: list[int] = []
    original = LongContextSession.encode_images

    def counting_encode(self, pictures, total=None):
        encoded.append(len(pictures))
        return original(self, pictures, total)

    monkeypatch.setattr(LongContextSession, "encode_images", counting_encode)
    questions = [[{"role": "user", "content": f"{series_prompt(4)}\n{q}"}] for q in ("What is shown?", "Is it new?")]
    uncached = ["".join(stream_answer(shared, m, images, 6)) for m in questions]
    assert encoded == [4, 4] and len(shared.features) == 0

    encoded.clear()
    first = "".join(stream_answer(shared, questions[0], images, 6, cache_key="study-1"))
    second = "".join(stream_answer(shared, questions[1], images, 6, cache_key="study-1"))
    assert [first, second] == uncached
    assert encoded == [4] and "study-1" in shared.features and shared.features.hits == 1


def test_feature_cache_keeps_the_budget_and_drops_the_least_recently_used(monkeypatch) -> None:
    import torch

    from apps.engine import FeatureCache

    cache = FeatureCache(budget_bytes=3 * 400)  # three (10, 10) float32 tensors
    tensors = {key: torch.full((10, 10), float(i)) for i, key in enumerate("abcd")}
    for key in "abc":
        cache.put(key, tensors[key])
    assert cache.get("a") is tensors["a"]  # "a" is now the most recent
    cache.put("d", tensors["d"])
    assert "b" not in cache and all(k in cache for k in "acd") and cache.used_bytes == 1200
    cache.put("huge", torch.zeros(20, 20))  # bigger than the whole budget: not kept, nothing evicted
    assert "huge" not in cache and len(cache) == 3
    cache.put(None, tensors["a"])
    assert cache.get(None) is None and cache.misses >= 1
    monkeypatch.setenv("LONGLLAVA_FEATURE_CACHE_MB", "0")
    off = FeatureCache.from_env()
    off.put("a", tensors["a"])
    assert "a" not in off
    monkeypatch.setenv("LONGLLAVA_FEATURE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="LONGLLAVA_FEATURE_CACHE_MB='lots'"):
        FeatureCache.from_env()


def test_model_folder_render_defaults_fill_unset_options(tiny_model_dir: Path, tmp_path: Path, study_files) -> None:
    """Options recorded by training (longllava_defaults.json) apply unless the command line set them."""
    import shutil

    from apps.ct_app import load_study
    from apps.launcher import apply_model_defaults
    from finetune.train import write_inference_defaults

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_inference_defaults(model_dir, {"num_slices": 6, "size": 48, "tile_size": 112, "max_tiles": 9,
                                         "tile_labels": True})
    config = apply_model_defaults(AppConfig(max_tiles=4, cache_dir=tmp_path / "cache"), str(model_dir))
    assert (config.num_slices, config.slice_size, config.tile_size, config.max_tiles) == (6, 48, 112, 4)
    assert config.tile_labels is True
    assert apply_model_defaults(AppConfig(), str(tiny_model_dir)) == AppConfig()  # nothing recorded
    study = load_study([study_files.nifti], config, slice_size=config.slice_size)
    assert len(study.model_slices) == 6 and study.model_slices[0].size == (48, 48)
