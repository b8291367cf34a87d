"""Satellite app: upload a GeoTIFF/PNG/JPEG, see its tile grid, ask about it, get tiles back as GeoJSON.

Page: an overview of the image with the model's tile grid drawn and labelled (row, col), the level
and tile count the tiler chose, a chat with streamed answers, the tiles an answer refers to
highlighted on the overview, and a GeoJSON download of those tiles (lon/lat when georeferenced,
pixels otherwise).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from apps.common import (
    DEFAULT_MAX_TILES,
    AppConfig,
    AppInputError,
    check_upload_size,
    guarded,
    progress_bridge,
    report_progress,
    upload_paths,
    with_progress,
    write_export,
)
from apps.engine import LOAD_QUEUE, MODEL_QUEUE, STATE_TTL_S, SharedModel, stream_answer

LOG = logging.getLogger("longllava.apps")

OVERVIEW_MAX_SIDE = 1024
MAX_CELL = 336
GRID_COLOUR = (255, 214, 0)
HIGHLIGHT_COLOUR = (255, 40, 40)


@dataclass
class RSImage:
    """A session's tiled image, its conversation and the tiles the last answer referred to."""

    tiled: Any  # domain_data.remote_sensing.tiling.TiledImage
    tile_images: list[Image.Image]  # read once, row-major
    overview: Image.Image  # mosaic of the tiles as the model sees them, grid not drawn yet
    cell: int  # side of one tile in the overview, pixels
    info: dict[str, Any]
    turns: list[tuple[str, str]] = field(default_factory=list)
    referenced: list[tuple[int, int]] = field(default_factory=list)
    cache_key: str = field(default_factory=lambda: uuid.uuid4().hex)  # its encoded images in the shared cache

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.tiled.grid
        return int(rows), int(cols)

    def model_images(self) -> list[Image.Image]:
        return [self.tiled.thumbnail, *self.tile_images]


# ----------------------------------------------------------------------------- loading


def load_image(paths: list[Path], config: AppConfig, tile_size: int) -> RSImage:
    from domain_data.remote_sensing.tiling import tile_image

    if not paths:
        raise AppInputError("no file uploaded: choose a GeoTIFF, PNG or JPEG image")
    if len(paths) > 1:
        raise AppInputError(f"{len(paths)} files uploaded: upload one image at a time")
    check_upload_size(paths, config.max_upload_mb)
    tiled = tile_image(paths[0], tile_size=tile_size, max_tiles=config.max_tiles or DEFAULT_MAX_TILES,
                       tile_labels=bool(config.tile_labels))
    rows, cols = (int(v) for v in tiled.grid)
    cell = max(24, min(MAX_CELL, OVERVIEW_MAX_SIDE // max(rows, cols)))  # display size, may upscale
    tile_images = list(tiled.iter_tiles())
    overview = mosaic(tile_images, rows, cols, cell)
    return RSImage(tiled=tiled, tile_images=tile_images, overview=overview, cell=cell, info=image_info(tiled))


def mosaic(tiles: list[Image.Image], rows: int, cols: int, cell: int) -> Image.Image:
    """The tiles (row-major) reduced to ``cell`` px and placed on a rows x cols canvas."""
    if len(tiles) != rows * cols:
        raise ValueError(f"grid {rows}x{cols} needs {rows * cols} tiles, got {len(tiles)}")
    canvas = Image.new("RGB", (cols * cell, rows * cell))
    for index, tile in enumerate(tiles):
        row, col = divmod(index, cols)
        canvas.paste(tile.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR), (col * cell, row * cell))
    return canvas


def image_info(tiled: Any) -> dict[str, Any]:
    """What the page shows about a tiled image: size, georeference, level and grid."""
    raster = tiled.raster
    rows, cols = (int(v) for v in tiled.grid)
    info: dict[str, Any] = {
        "size (width x height)": f"{raster.width} x {raster.height} px",
        "georeferenced": f"yes ({raster.crs_text})" if tiled.georeferenced else
        "no (answers are mapped to pixel coordinates)",
        "level": f"1/{tiled.level} of full resolution" if tiled.level > 1 else "full resolution",
        "grid (rows x cols)": f"{rows} x {cols}",
        "tiles": rows * cols,
        "tile size": f"{tiled.tile_size} px",
    }
    if tiled.note:
        info["tiler note"] = tiled.note
    return info


def info_markdown(image: RSImage) -> str:
    lines = ["### Image loaded", ""]
    lines += [f"- **{key}**: {value}" for key, value in image.info.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- overlay


def tile_label(row: int, col: int) -> str:
    """The label drawn on tile (row, col); the same numbering the model and the answers use."""
    return f"({row},{col})"


def draw_overlay(image: RSImage, referenced: list[tuple[int, int]] | None = None) -> Image.Image:
    """The overview with the grid lines, (row, col) labels and referenced tiles highlighted."""
    rows, cols = image.grid
    cell = image.cell
    canvas = image.overview.copy().convert("RGBA")
    shade = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    shade_draw = ImageDraw.Draw(shade)
    for row, col in referenced or []:
        if 0 <= row < rows and 0 <= col < cols:
            box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
            shade_draw.rectangle(box, fill=HIGHLIGHT_COLOUR + (90,))
    canvas = Image.alpha_composite(canvas, shade).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(max(9, cell // 7))
    for row in range(rows):
        for col in range(cols):
            box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
            draw.rectangle(box, outline=GRID_COLOUR, width=1)
            label = tile_label(*_display_index(row, col))
            draw.text((box[0] + 3, box[3] - 3), label, fill=GRID_COLOUR, font=font, stroke_width=1,
                      stroke_fill=(0, 0, 0), anchor="ld")  # bottom-left: the page's label covers top-left
    for row, col in referenced or []:
        if 0 <= row < rows and 0 <= col < cols:
            box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
            draw.rectangle(box, outline=HIGHLIGHT_COLOUR, width=max(2, cell // 24))
    return canvas


def _display_index(row: int, col: int) -> tuple[int, int]:
    """Zero-based grid index -> the numbering used in labels and answers."""
    from domain_data.remote_sensing import georef

    base = int(getattr(georef, "TILE_INDEX_BASE", 1))  # the tiler's text counts rows/cols from 1
    return row + base, col + base


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# ----------------------------------------------------------------------------- answers


def model_messages(image: RSImage, question: str) -> list[dict]:
    prompt = image.tiled.prompt
    messages: list[dict] = []
    for index, (asked, answered) in enumerate(image.turns):
        content = f"{prompt}\n{asked}" if index == 0 else asked
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": f"{prompt}\n{question}" if not image.turns else question})
    return messages


def referenced_tiles(answer: str, image: RSImage) -> list[tuple[int, int]]:
    """Zero-based (row, col) of every tile the answer refers to."""
    from domain_data.remote_sensing.georef import referenced_tiles as find_tiles

    return [(int(r), int(c)) for r, c in find_tiles(answer, image.grid)]


def geojson_export(answer: str, image: RSImage, config: AppConfig) -> tuple[str, int]:
    """Write the GeoJSON of the tiles/boxes referenced in ``answer``; returns (path, feature count)."""
    from domain_data.remote_sensing.georef import answer_to_geojson

    collection = answer_to_geojson(answer, image.tiled)
    path = write_export(config, "referenced-tiles", ".geojson", json.dumps(collection, indent=2))
    return str(path), len(collection.get("features", []))


def chat_history(image: RSImage | None) -> list[dict]:
    history: list[dict] = []
    for asked, answered in image.turns if image else []:
        history += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return history


# ----------------------------------------------------------------------------- page


def close_image(image: RSImage | None) -> None:
    """Release the raster a session's tiled image holds open (Gradio calls it when the state expires)."""
    if image is not None:
        image.tiled.close()


class RSHandlers:
    """The satellite page's event handlers; each returns (or yields) one value per output component."""

    def __init__(self, shared: SharedModel, config: AppConfig) -> None:
        self.shared = shared
        self.config = config
        self.tile_size = config.tile_size or shared.image_size()

    def loaded(self, image: RSImage, note: str) -> tuple:
        """Outputs after an image loads: state, status, info, overlay, chat, GeoJSON file, chat status."""
        rows, cols = image.grid
        LOG.info("raster loaded: grid %dx%d", rows, cols)
        status = f"{note} {rows * cols} tiles + thumbnail ready for the model."
        return image, status, info_markdown(image), draw_overlay(image), [], None, ""

    def on_upload(self, file: Any, progress: Any = None) -> tuple:
        report_progress(progress, 0.1, "Reading and tiling the image")
        return self.loaded(load_image(upload_paths(file), self.config, self.tile_size), "Image loaded.")

    def on_sample(self, progress: Any = None) -> tuple:
        from apps.samples import sample_raster, sample_truth

        report_progress(progress, 0.1, "Preparing the sample image")
        path = sample_raster(self.config.sample_dir())
        image = load_image([path], self.config, self.tile_size)
        return self.loaded(image, f"Sample image loaded (synthetic scene; {sample_truth(path)}).")

    def on_ask(self, image: RSImage | None, text: str, progress: Any = None):
        """Stream the answer: yields (chat, status, question box, state, overlay, GeoJSON file)."""
        import gradio as gr

        if image is None:
            raise AppInputError("no image loaded yet: upload an image or click 'Load sample image' first")
        text = (text or "").strip()
        if not text:
            raise AppInputError("type a question about the image first")
        asked = chat_history(image) + [{"role": "user", "content": text}]
        count = len(image.tile_images) + 1
        report_progress(progress, 0.0, f"Encoding {count} images")
        yield asked, f"Encoding {count} images and answering…", "", image, gr.skip(), gr.skip()
        started = time.perf_counter()
        answer = ""
        for piece in stream_answer(self.shared, model_messages(image, text), image.model_images(),
                                   self.config.max_new_tokens, progress_bridge(progress), cache_key=image.cache_key):
            answer += piece
            history = asked + [{"role": "assistant", "content": answer}]
            yield history, f"Answering… ({len(answer)} characters)", "", image, gr.skip(), gr.skip()
        answer = answer.strip() or "(the model returned no text)"
        image.turns.append((text, answer))
        image.referenced = referenced_tiles(answer, image)
        history = asked + [{"role": "assistant", "content": answer}]
        path, features = geojson_export(answer, image, self.config)
        took = time.perf_counter() - started
        note = (f"Answered in {took:.1f} s; {len(image.referenced)} tile(s) referenced, "
                f"{features} GeoJSON feature(s).")
        yield history, note, "", image, draw_overlay(image, image.referenced), path


def build_rs_tab(shared: SharedModel, config: AppConfig) -> dict[str, Any]:
    """Add the satellite app's components and events to the enclosing ``gr.Blocks``.

    Returns the 'load sample' event (fn, inputs, outputs, queue) so a launcher can run it on page load.
    """
    import gradio as gr

    handlers = RSHandlers(shared, config)
    image_state = gr.State(None, time_to_live=STATE_TTL_S, delete_callback=close_image)  # frees abandoned sessions
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image: GeoTIFF, PNG or JPEG", file_count="single", elem_id="rs-upload")
            sample_button = gr.Button("Load sample image", elem_id="rs-sample")
            status = gr.Markdown("Upload an image or load the sample.", elem_id="rs-status")
            info = gr.Markdown("", elem_id="rs-info")
            geojson = gr.File(label="Referenced tiles (GeoJSON)", interactive=False, elem_id="rs-geojson")
        with gr.Column(scale=2):
            overlay = gr.Image(label="Tile grid (row, col); tiles named in the answer in red", type="pil",
                               interactive=False, elem_id="rs-overlay", height=480)
    chatbot = gr.Chatbot(label="Conversation about the image", elem_id="rs-chat", height=300)
    chat_status = gr.Markdown("", elem_id="rs-chat-status")
    with gr.Row():
        question = gr.Textbox(label="Question", placeholder="Which tiles contain ships?", scale=4,
                              elem_id="rs-question")
        ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="rs-ask")

    loaded_outputs = [image_state, status, info, overlay, chatbot, geojson, chat_status]
    on_upload = guarded("load raster", len(loaded_outputs), 1)(with_progress(handlers.on_upload))
    on_sample = guarded("load sample raster", len(loaded_outputs), 1)(with_progress(handlers.on_sample))
    on_ask = guarded("answer raster question", 6, 1)(with_progress(handlers.on_ask))

    model_queue = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=config.concurrency_limit)
    load_queue = dict(concurrency_id=LOAD_QUEUE, concurrency_limit=config.concurrency_limit)
    upload.upload(on_upload, [upload], loaded_outputs, api_name="rs_upload", **load_queue)
    sample_button.click(on_sample, [], loaded_outputs, api_name="rs_sample", **load_queue)
    ask_event = dict(fn=on_ask, inputs=[image_state, question],
                     outputs=[chatbot, chat_status, question, image_state, overlay, geojson],
                     show_progress_on=[chat_status], **model_queue)
    ask_button.click(**ask_event, api_name="rs_ask")
    question.submit(**ask_event, api_name=False)
    return dict(fn=on_sample, inputs=[], outputs=loaded_outputs, **load_queue)
