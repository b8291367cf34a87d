"""CT app: upload a study (NIfTI, or a DICOM series as .zip or several files), look at it, ask about it.

Page: what was loaded (series, slices, spacing; never patient identifiers), a slice viewer with
window presets and a montage, a chat with streamed answers, a one-click findings checklist over
CT-RATE's 18 abnormalities, and JSON/markdown export of the conversation and the findings.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from apps.common import (
    AppConfig,
    AppInputError,
    check_upload_size,
    guarded,
    progress_bridge,
    timestamp,
    upload_paths,
    with_progress,
    write_export,
)
from apps.common import (
    report_progress as _report,
)
from apps.engine import (
    LOAD_QUEUE,
    MODEL_QUEUE,
    STATE_TTL_S,
    VIEW_CONCURRENCY,
    VIEW_QUEUE,
    SharedModel,
    stream_answer,
)

LOG = logging.getLogger("longllava.apps")

VIEW_WINDOWS: tuple[str, ...] = ("lung", "mediastinum", "bone")
VIEWER_MAX_SIDE = 384
VIEWER_MIN_SIDE = 320
MONTAGE_SLICES = 16

# Non-identifying metadata keys that may be shown and exported; anything else the loader returns is
# dropped, so a new metadata field can never leak a header value by accident.
SAFE_METADATA_KEYS: tuple[str, ...] = (
    "source_kind",
    "modality",
    "series_description",
    "source_slices",
    "dropped_localizers",
    "dropped_duplicate_positions",
    "skipped_non_dicom_files",
    "transfer_syntaxes",
    "uneven_spacing",
    "original_orientation",
    "orientation",
    "warnings",
)


@dataclass
class CTStudy:
    """Everything a session keeps about its loaded study (no file names, no header values)."""

    model_slices: list[Image.Image]
    visual_prompt: str
    viewer_hu: np.ndarray  # (z, y, x) int16 HU, in-plane decimated to <= VIEWER_MAX_SIDE
    summary: dict[str, Any]
    turns: list[tuple[str, str]] = field(default_factory=list)
    findings: dict[str, str] = field(default_factory=dict)
    findings_raw: str = ""
    cache_key: str = field(default_factory=lambda: uuid.uuid4().hex)  # its encoded slices in the shared cache
    model_image_noun: str = "slices"  # what each model image is: "slices", or "slabs" (projections of planes)

    def model_images(self) -> str:
        """'16 slabs' / '64 slices': what the model is fed, in the status lines."""
        return f"{len(self.model_slices)} {self.model_image_noun}"


# ----------------------------------------------------------------------------- loading


def stage_upload(paths: list[Path], workdir: Path) -> Path:
    """The path ``load_ct`` reads: the file itself, or a folder holding several DICOM files."""
    if not paths:
        raise AppInputError("no file uploaded: choose a NIfTI file (.nii/.nii.gz), a .zip of a DICOM series, "
                            "or several DICOM files")
    if len(paths) == 1:
        return paths[0]
    single_file_kinds = [p.name for p in paths if p.name.lower().endswith((".nii", ".nii.gz", ".zip"))]
    if single_file_kinds:
        raise AppInputError(
            f"{len(paths)} files uploaded, including {single_file_kinds[0]}: upload one NIfTI file or one "
            ".zip at a time; several files are read as the DICOM slices of one series"
        )
    folder = workdir / "series"
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths):
        if not path.is_file():
            raise AppInputError(f"upload item {index + 1} is not a file: upload DICOM files, not folders")
        shutil.copyfile(path, folder / f"{index:05d}.dcm")  # neutral names: originals may carry names
    return folder


def load_study(paths: list[Path], config: AppConfig, slice_size: int) -> CTStudy:
    """Read an uploaded study and prepare the model's slices and the viewer's volume."""
    from domain_data.medical.ct import load_ct
    from domain_data.medical.slices import SLAB_WINDOW, ct_to_slices

    check_upload_size(paths, config.max_upload_mb)
    with tempfile.TemporaryDirectory(prefix="ct-upload-", dir=_work_root(config)) as workdir:
        volume = load_ct(stage_upload(paths, Path(workdir)))
    slices = ct_to_slices(volume, num_slices=config.num_slices, spacing_mm=config.spacing_mm, window=config.window or "multi",
                          size=slice_size)
    images = list(slices.images)
    hu = np.asarray(volume.hu)
    summary = summary_fields(volume, hu.shape, len(images))
    summary["slices_for_model_note"] = str(slices.resampled)
    return CTStudy(
        model_slices=images,
        visual_prompt=slices.prompt,
        viewer_hu=decimate_for_viewer(hu),
        summary=summary,
        model_image_noun="slabs" if config.window == SLAB_WINDOW else "slices",
    )


def _work_root(config: AppConfig) -> Path:
    root = Path(config.cache_dir) / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def summary_fields(volume: Any, shape: tuple[int, ...], model_slice_count: int) -> dict[str, Any]:
    """Whitelisted, non-identifying description of a loaded study."""
    spacing = [round(float(s), 3) for s in getattr(volume, "spacing_mm", ())]
    summary: dict[str, Any] = {
        "slices": int(shape[0]),
        "matrix": f"{shape[1]} x {shape[2]}",
        "spacing_mm (z, y, x)": spacing,
        "slices_for_model": model_slice_count,
    }
    hu = np.asarray(volume.hu)
    summary["hu_range"] = [float(np.nanmin(hu)), float(np.nanmax(hu))]
    metadata = getattr(volume, "metadata", None) or {}
    if not isinstance(metadata, dict):
        metadata = getattr(metadata, "__dict__", {}) or {}
    for key in SAFE_METADATA_KEYS:
        value = metadata.get(key)
        if value not in (None, "", [], {}, 0):
            summary[key] = _plain(value)
    other_series = metadata.get("other_series") or []
    if other_series:  # counted only: their UIDs are not shown
        summary["other_series_in_upload"] = len(other_series)
    return summary


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def decimate_for_viewer(hu: np.ndarray) -> np.ndarray:
    """HU volume (z, y, x) reduced in-plane by striding so the longest side is <= VIEWER_MAX_SIDE."""
    step = max(1, math.ceil(max(hu.shape[1], hu.shape[2]) / VIEWER_MAX_SIDE))
    reduced = hu[:, ::step, ::step]  # (z, ceil(y/step), ceil(x/step))
    return np.clip(np.nan_to_num(reduced), -32768, 32767).astype(np.int16)


def summary_markdown(study: CTStudy) -> str:
    lines = ["### Study loaded", ""]
    for key, value in study.summary.items():
        lines.append(f"- **{key}**: {value}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- viewer


def window_slice(hu_slice: np.ndarray, window: str) -> Image.Image:
    """One HU slice (y, x) as an 8-bit grey image under a named window."""
    from domain_data.medical.windows import apply_window

    if window not in VIEW_WINDOWS:
        raise AppInputError(f"unknown window {window!r}: choose one of {', '.join(VIEW_WINDOWS)}")
    pixels = apply_window(hu_slice, window)  # (y, x) uint8
    return Image.fromarray(pixels)


def slice_view(study: CTStudy, index: int, window: str) -> Image.Image:
    """Slice ``index`` under ``window``, enlarged to at least VIEWER_MIN_SIDE for display."""
    depth = study.viewer_hu.shape[0]
    index = int(min(max(int(index), 0), depth - 1))
    image = window_slice(study.viewer_hu[index], window)
    factor = VIEWER_MIN_SIDE / max(image.size)
    if factor > 1:
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.NEAREST)
    return image


def montage_view(study: CTStudy, window: str) -> Image.Image:
    """Evenly spaced slices of the study under ``window`` tiled in one image."""
    from domain_data.medical.slices import montage

    depth = study.viewer_hu.shape[0]
    count = min(MONTAGE_SLICES, depth)
    indices = np.linspace(0, depth - 1, count).round().astype(int)
    tiles = [window_slice(study.viewer_hu[i], window) for i in indices]
    return montage(tiles, columns=4, max_images=MONTAGE_SLICES, tile=160)


# ----------------------------------------------------------------------------- chat


def model_messages(study: CTStudy, question: str) -> list[dict]:
    """Chat messages for the model: the slice series leads the first user turn."""
    messages: list[dict] = []
    for index, (asked, answered) in enumerate(study.turns):
        content = f"{study.visual_prompt}\n{asked}" if index == 0 else asked
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answered}]
    content = f"{study.visual_prompt}\n{question}" if not study.turns else question
    messages.append({"role": "user", "content": content})
    return messages


def chat_history(study: CTStudy | None) -> list[dict]:
    if study is None:
        return []
    history: list[dict] = []
    for asked, answered in study.turns:
        history += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return history


def findings_question() -> str:
    """The report request the CT models are trained and scored with (CT-RATE: report -> 18 labels)."""
    from finetune.evaluate import REPORT_QUESTION

    return REPORT_QUESTION


def findings_table(raw_answer: str) -> dict[str, str]:
    """Parse the model's report into present / not found for each of CT-RATE's 18 abnormalities
    (``parse_findings``: explicit "name: yes/no" lines, else negation-aware mentions)."""
    from domain_data.medical.metrics import CT_RATE_ABNORMALITIES, parse_findings

    parsed = parse_findings(raw_answer)
    return {name: _finding_label(parsed.get(name)) for name in CT_RATE_ABNORMALITIES}


def _finding_label(value: Any) -> str:
    """``parse_findings`` gives 1 for a positive mention, 0 for a negative one or none at all."""
    return "present" if value else "not found"


# ----------------------------------------------------------------------------- export


def export_payload(study: CTStudy, model_name: str) -> dict[str, Any]:
    return {
        "app": "longllava-ct",
        "model": model_name,
        "exported_at": timestamp(),
        "study": study.summary,
        "conversation": [{"question": q, "answer": a} for q, a in study.turns],
        "findings": study.findings,
        "findings_report": study.findings_raw,
    }


def export_markdown(payload: dict[str, Any]) -> str:
    lines = [f"# CT study conversation ({payload['exported_at']})", "", f"Model: `{payload['model']}`", "",
             "## Study", ""]
    lines += [f"- **{k}**: {v}" for k, v in payload["study"].items()]
    lines += ["", "## Conversation", ""]
    for number, turn in enumerate(payload["conversation"], 1):
        lines += [f"**Q{number}.** {turn['question']}", "", f"**A{number}.** {turn['answer']}", ""]
    lines += ["## Findings checklist (CT-RATE abnormalities)", ""]
    if payload["findings"]:
        quoted = "\n".join(f"> {line}" for line in (payload["findings_report"].strip() or "(empty)").splitlines())
        lines += ["Parsed from the model's report:", "", quoted, ""]
        lines += ["| Abnormality | Finding |", "|---|---|"]
        lines += [f"| {name} | {label} |" for name, label in payload["findings"].items()]
    else:
        lines.append("Not run.")
    return "\n".join(lines) + "\n"


def write_exports(study: CTStudy, config: AppConfig, model_name: str) -> list[str]:
    payload = export_payload(study, model_name)
    json_path = write_export(config, "ct-conversation", ".json", json.dumps(payload, indent=2))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(export_markdown(payload), encoding="utf-8")
    return [str(json_path), str(md_path)]


# ----------------------------------------------------------------------------- page


class CTHandlers:
    """The CT page's event handlers; each returns (or yields) one value per output component."""

    def __init__(self, shared: SharedModel, config: AppConfig) -> None:
        self.shared = shared
        self.config = config
        self.slice_size = config.slice_size or shared.image_size()

    def loaded(self, study: CTStudy, window_name: str, note: str) -> tuple:
        """Outputs after a study loads: state, status, summary, slider, slice, montage, chat, findings,
        chat status, report."""
        import gradio as gr

        depth = study.viewer_hu.shape[0]
        middle = depth // 2
        LOG.info("ct study loaded: %d slices, %d for the model", depth, len(study.model_slices))
        slider = gr.Slider(minimum=0, maximum=max(depth - 1, 1), value=middle, step=1)
        return (study, f"{note} {study.model_images()} ready for the model.", summary_markdown(study),
                slider, slice_view(study, middle, window_name), montage_view(study, window_name), [], None, "", "")

    def on_upload(self, files: Any, window_name: str, progress: Any = None) -> tuple:
        _report(progress, 0.1, "Reading the study")
        study = load_study(upload_paths(files), self.config, self.slice_size)
        return self.loaded(study, window_name, "Study loaded.")

    def on_sample(self, window_name: str, progress: Any = None) -> tuple:
        from apps.samples import sample_ct_study, sample_truth

        _report(progress, 0.1, "Preparing the sample study")
        path = sample_ct_study(self.config.sample_dir())
        study = load_study([path], self.config, self.slice_size)
        return self.loaded(study, window_name, f"Sample study loaded (synthetic phantom; {sample_truth(path)}).")

    def on_view(self, study: CTStudy | None, index: float, window_name: str) -> tuple:
        import gradio as gr

        if study is None:
            return gr.skip(), gr.skip(), gr.skip()
        return slice_view(study, int(index), window_name), montage_view(study, window_name), gr.skip()

    def on_ask(self, study: CTStudy | None, text: str, progress: Any = None):
        """Stream the answer: yields (chat, status, question box, state)."""
        study = _require_study(study)
        text = (text or "").strip()
        if not text:
            raise AppInputError("type a question about the study first")
        asked = chat_history(study) + [{"role": "user", "content": text}]
        _report(progress, 0.0, f"Encoding {study.model_images()}")
        cached = study.cache_key in self.shared.features
        yield asked, (f"Answering ({study.model_image_noun} already encoded)…" if cached
                      else f"Encoding {study.model_images()} and answering…"), "", study
        started = time.perf_counter()
        answer = ""
        for piece in stream_answer(self.shared, model_messages(study, text), study.model_slices,
                                   self.config.max_new_tokens, progress_bridge(progress), cache_key=study.cache_key):
            answer += piece
            history = asked + [{"role": "assistant", "content": answer}]
            yield history, f"Answering… ({len(answer)} characters)", "", study
        answer = answer.strip() or "(the model returned no text)"
        study.turns.append((text, answer))
        history = asked + [{"role": "assistant", "content": answer}]
        took = time.perf_counter() - started
        LOG.info("ct answer: %d characters in %.1f s", len(answer), took)
        yield history, f"Answered in {took:.1f} s.", "", study

    def on_findings(self, study: CTStudy | None, progress: Any = None):
        """Ask for the report, parse the 18 abnormalities: yields (table, status, state, exports, report)."""
        import gradio as gr

        study = _require_study(study)
        _report(progress, 0.0, f"Encoding {study.model_images()}")
        yield gr.skip(), f"Running the findings checklist over {study.model_images()}…", study, gr.skip(), gr.skip()
        messages = [{"role": "user", "content": f"{study.visual_prompt}\n{findings_question()}"}]
        raw = "".join(stream_answer(self.shared, messages, study.model_slices,
                                    self.config.findings_max_new_tokens, progress_bridge(progress),
                                    cache_key=study.cache_key))
        study.findings_raw = raw
        study.findings = findings_table(raw)
        rows = [[name, label] for name, label in study.findings.items()]
        present = sum(label == "present" for label in study.findings.values())
        shown = raw.strip() or "(the model returned no text)"
        yield (rows, f"Findings checklist done: {present} of {len(rows)} marked present.", study, gr.skip(),
               f"**Model's report** (parsed into the checklist): {shown}")

    def on_export(self, study: CTStudy | None) -> tuple:
        study = _require_study(study)
        return write_exports(study, self.config, self.shared.name), "Exported conversation and findings."


def build_ct_tab(shared: SharedModel, config: AppConfig) -> dict[str, Any]:
    """Add the CT app's components and events to the enclosing ``gr.Blocks``.

    Returns the 'load sample' event (fn, inputs, outputs, queue) so a launcher can run it on page load.
    """
    import gradio as gr

    handlers = CTHandlers(shared, config)
    study_state = gr.State(None, time_to_live=STATE_TTL_S)  # frees abandoned sessions
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="CT study: NIfTI (.nii/.nii.gz), DICOM .zip, or several DICOM files",
                             file_count="multiple", elem_id="ct-upload", height=220)
            sample_button = gr.Button("Load sample study", elem_id="ct-sample")
            status = gr.Markdown("Upload a study or load the sample.", elem_id="ct-status")
            summary = gr.Markdown("", elem_id="ct-summary")
        with gr.Column(scale=2):
            window = gr.Radio(list(VIEW_WINDOWS), value="lung", label="Window", elem_id="ct-window")
            slice_index = gr.Slider(0, 1, value=0, step=1, label="Slice", elem_id="ct-slice")
            with gr.Row():
                view = gr.Image(label="Slice", type="pil", interactive=False, elem_id="ct-view", height=320)
                montage_image = gr.Image(label="Montage", type="pil", interactive=False, elem_id="ct-montage",
                                         height=320)
    chatbot = gr.Chatbot(label="Conversation about the study", elem_id="ct-chat", height=320)
    chat_status = gr.Markdown("", elem_id="ct-chat-status")
    with gr.Row():
        question = gr.Textbox(label="Question", placeholder="Is there a pleural effusion?", scale=4,
                              elem_id="ct-question")
        ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="ct-ask")
    with gr.Row():
        findings_button = gr.Button("Findings checklist (report -> 18 CT-RATE abnormalities)",
                                    elem_id="ct-findings-btn")
        export_button = gr.Button("Export conversation + findings", elem_id="ct-export-btn")
    findings = gr.Dataframe(headers=["Abnormality", "Finding"], label="Findings checklist",
                            interactive=False, elem_id="ct-findings")
    report = gr.Markdown("", elem_id="ct-report")
    exports = gr.File(label="Exports (JSON, markdown)", file_count="multiple", interactive=False,
                      elem_id="ct-exports", height=120)

    loaded_outputs = [study_state, status, summary, slice_index, view, montage_image, chatbot, findings, chat_status,
                      report]
    on_upload = guarded("load CT study", len(loaded_outputs), 1)(with_progress(handlers.on_upload))
    on_sample = guarded("load sample CT study", len(loaded_outputs), 1)(with_progress(handlers.on_sample))
    on_view = guarded("show CT slice", 3, 2)(handlers.on_view)
    on_ask = guarded("answer CT question", 4, 1)(with_progress(handlers.on_ask))
    on_findings = guarded("run findings checklist", 5, 1)(with_progress(handlers.on_findings))
    on_export = guarded("export CT conversation", 2, 1)(handlers.on_export)

    model_queue = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=config.concurrency_limit)
    load_queue = dict(concurrency_id=LOAD_QUEUE, concurrency_limit=config.concurrency_limit)
    view_queue = dict(concurrency_id=VIEW_QUEUE, concurrency_limit=VIEW_CONCURRENCY)
    upload.upload(on_upload, [upload, window], loaded_outputs, api_name="ct_upload", **load_queue)
    sample_button.click(on_sample, [window], loaded_outputs, api_name="ct_sample", **load_queue)
    view_inputs, view_outputs = [study_state, slice_index, window], [view, montage_image, status]
    slice_index.change(on_view, view_inputs, view_outputs, api_name=False, show_progress="hidden", **view_queue)
    window.change(on_view, view_inputs, view_outputs, api_name=False, **view_queue)
    ask_event = dict(fn=on_ask, inputs=[study_state, question],
                     outputs=[chatbot, chat_status, question, study_state], show_progress_on=[chat_status],
                     **model_queue)
    ask_button.click(**ask_event, api_name="ct_ask")
    question.submit(**ask_event, api_name=False)
    findings_button.click(on_findings, [study_state], [findings, chat_status, study_state, exports, report],
                          api_name="ct_findings", show_progress_on=[chat_status], **model_queue)
    export_button.click(on_export, [study_state], [exports, chat_status], api_name="ct_export", **view_queue)
    return dict(fn=on_sample, inputs=[window], outputs=loaded_outputs, **load_queue)


def _require_study(study: CTStudy | None) -> CTStudy:
    if study is None:
        raise AppInputError("no study loaded yet: upload a CT study or click 'Load sample study' first")
    return study
