"""Training data: LLaVA-style conversation records -> token ids, labels and pixel values.

A record (one JSON object; files are a JSON list or JSONL)::

    {"id": "case-1",
     "images": ["a.png", "b.png"],          # or "image": "a.png" / ["a.png", ...] (LLaVA, PubMedVision)
     "layout": "images",                     # "images" | "series" | "grid"  (default "images")
     "grid": [rows, cols],                   # layout "grid" only: thumbnail + rows*cols tiles
     "ct": "study.nii.gz",                   # instead of images: a CT study -> ordered slice series
     "raster": "scene.tif",                  # instead of images: a large raster -> thumbnail + tile grid
     "render": {"num_slices": 128, "max_tiles": 64, "tile_size": 336},   # options for ct / raster
                                             # (+ "tile_labels": true for grids; see longllava.protocol)
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}

The synthetic sets' form is accepted too: one ``image`` that is a CT study (``.nii``/``.nii.gz``/``.zip``/
``.dcm`` or a DICOM folder) with ``layout: series`` is read as ``ct``; one ``image`` with ``layout: grid``
and no ``grid`` is read as ``raster``; render options may also sit at the top level of the record
(``num_slices``, ``spacing_mm``, ``window``, ``size``, ``tile_size``, ``max_tiles``). Precedence:
``render`` > top-level keys > the recipe's ``render`` defaults. ``ct-rate:ROOT[:SPLIT]`` as a data path
reads a CT-RATE release (one report-writing record per volume).

Image placeholders: if no human turn holds ``<image>``, the visual prompt of the layout
(:mod:`longllava.protocol`) is put in front of the first human turn. Bare ``<image>`` tokens are
wrapped: one per image for ``images``; a single ``<image>`` stands for the whole block for ``series``
and ``grid``. Text already written in protocol form (``<img><image></img>``) is kept as is.

CT studies and rasters are converted by the domain functions
(:func:`domain_data.medical.ct_to_slices`, :func:`domain_data.remote_sensing.tile_image`) once and
cached as PNG files (keyed by source path, size, modification time and options), so later epochs read
small images instead of re-reading volumes.

Tokens: the conversation is rendered by the tokenizer's chat template; :func:`longllava.protocol.
render_conversation` tells which pieces are assistant answers (the only supervised tokens). Every
``<image>`` token is expanded to ``tokens_per_image`` copies, as the processor does at inference.
A record whose pieces do not tokenize to the same ids as the whole text raises
:class:`DataError` (never silently dropped), as does a record longer than ``max_length``.

Packing: whole samples are concatenated up to ``max_length`` (each ends with ``<|endoftext|>``).
``position_ids`` restart at 0 for every sample, which is how transformers' flash-attention path
keeps attention inside each sample; with SDPA/eager attention and in the Mamba layers the samples
see their predecessors (as in the paper's packed training). Labels stay aligned by construction:
each sample's first token (``<|startoftext|>``) is never a target, so no sample is trained to
predict the next sample's tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import FinetuneError
from longllava import protocol
from longllava.protocol import IMAGE_TOKEN, IMG_START

IGNORE_INDEX = -100
LAYOUTS = ("images", "series", "grid")
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CT_SUFFIXES = (".nii", ".nii.gz", ".zip", ".dcm")
RENDER_KEYS = ("num_slices", "spacing_mm", "window", "size", "tile_size", "max_tiles")


class DataError(FinetuneError):
    """A training or evaluation record that cannot be read, rendered or tokenized."""


@dataclass(frozen=True)
class TrainingRecord:
    """One conversation with its visual input; ``where`` names the file and line for messages."""

    id: str
    conversations: tuple[dict, ...]
    images: tuple[Path, ...] = ()
    layout: str = "images"
    grid: tuple[int, int] | None = None
    ct: Path | None = None
    raster: Path | None = None
    render: dict = field(default_factory=dict)
    where: str = ""


@dataclass(frozen=True)
class Visuals:
    """Image files in model order and the protocol text that introduces them."""

    paths: tuple[Path, ...]
    prompt: str


@dataclass
class EncodedSample:
    """A tokenized record: image tokens already expanded; ``labels`` is -100 off the answers."""

    record_id: str
    input_ids: list[int]
    labels: list[int]
    image_paths: list[Path]

    def __len__(self) -> int:
        return len(self.input_ids)


# ----------------------------------------------------------------------------------------------
# Reading records


def read_json_records(path: str | Path) -> list[tuple[str, dict]]:
    """Raw objects of a JSON list or JSONL file, each with ``file:line`` (or ``file[index]``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found; pass an existing .json or .jsonl file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line") from None
        return rows
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); fix the file") from None
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of records (or a .jsonl file), got {type(payload).__name__}")
    return [(f"{path}[{index}]", row) for index, row in enumerate(payload)]


def _as_path_list(value: Any, where: str, root: Path) -> tuple[Path, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise DataError(f"{where}: 'images' must be a path or a list of paths, got {value!r}")
    return tuple((root / item) if not Path(item).is_absolute() else Path(item) for item in items)


def _is_ct_source(path: Path) -> bool:
    return path.is_dir() or path.name.lower().endswith(CT_SUFFIXES)


def parse_record(raw: dict, where: str, root: Path, render_defaults: dict | None = None) -> TrainingRecord:
    """Validate one raw object; relative paths are resolved against ``root``; ``render_defaults`` are
    CT / raster options used where the record sets none."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: record needs a non-empty 'conversations' list of {{from, value}} turns")
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_OF or not isinstance(turn.get("value"), str):
            raise DataError(
                f"{where}: bad turn {turn!r}; each turn is {{'from': human|gpt|system, 'value': text}}"
            )
    layout = raw.get("layout", "images")
    if layout not in LAYOUTS:
        raise DataError(f"{where}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    images = _as_path_list(raw.get("images", raw.get("image")), where, root)
    ct = Path(root / raw["ct"]) if raw.get("ct") else None
    raster = Path(root / raw["raster"]) if raw.get("raster") else None
    if sum(bool(x) for x in (images, ct, raster)) > 1:
        raise DataError(f"{where}: give only one of 'images', 'ct' or 'raster'")
    grid = raw.get("grid")
    if grid is not None:
        if not (isinstance(grid, list | tuple) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
            raise DataError(f"{where}: 'grid' must be [rows, cols] of positive integers, got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    render = raw.get("render", {})
    if not isinstance(render, dict):
        raise DataError(f"{where}: 'render' must be an object of options, got {render!r}")
    render = {**(render_defaults or {}), **{k: raw[k] for k in RENDER_KEYS if k in raw}, **render}
    record_id = str(raw.get("id", where))
    if len(images) == 1 and layout == "series" and _is_ct_source(images[0]):
        ct, images = images[0], ()  # LLaVA-style record whose one "image" is a CT study
    if len(images) == 1 and layout == "grid" and grid is None:
        raster, images = images[0], ()  # one large image to tile
    if layout == "grid" and images and grid is None:
        raise DataError(f"{where}: layout 'grid' with an image list needs 'grid': [rows, cols]")
    if ct is not None:
        layout = "series"
    if raster is not None:
        layout = "grid"
    return TrainingRecord(record_id, tuple(conversations), images, layout, grid, ct, raster, render, where)


def load_records(path: str | Path, image_root: str | Path | None = None,
                 render_defaults: dict | None = None) -> list[TrainingRecord]:
    """Records of one data file; image paths are relative to ``image_root`` (default: the file's folder).

    ``ct-rate:ROOT[:SPLIT]`` reads a CT-RATE release instead: one report-writing record per volume."""
    if str(path).startswith("ct-rate:"):
        return ct_rate_records(str(path), render_defaults)
    root = Path(image_root) if image_root else Path(path).parent
    return [parse_record(raw, where, root, render_defaults) for where, raw in read_json_records(path)]


CT_REPORT_QUESTION = "Write the findings and impressions of this chest CT."


def ct_rate_records(spec: str, render_defaults: dict | None = None) -> list[TrainingRecord]:
    """``ct-rate:ROOT[:SPLIT]`` -> records asking for the report of each volume (answer: findings +
    impressions); the volume is rescaled with its metadata row when rendered."""
    from domain_data.medical.constants import report_answer
    from domain_data.medical.ct_rate import CTRateDataset

    _, root, *rest = spec.split(":")
    split = rest[0] if rest else "train"
    records = []
    for row in CTRateDataset(root, split=split, require_labels=False):
        answer = report_answer(row.findings, row.impressions)
        render = {**(render_defaults or {}), "ct_rate_metadata": row.metadata_row or None}
        conversations = ({"from": "human", "value": CT_REPORT_QUESTION}, {"from": "gpt", "value": answer})
        records.append(TrainingRecord(row.volume_name, conversations, (), "series", None, row.volume_path, None,
                                      render, f"{spec}:{row.volume_name}"))
    return records


def mix_with_replay(
    records: Sequence[TrainingRecord], replay: Sequence[TrainingRecord], ratio: float, seed: int
) -> list[TrainingRecord]:
    """The ``multi`` stage's data: ``records`` plus ``ratio * len(records)`` replayed earlier-stage
    records (sampled without replacement while possible), shuffled with ``seed``."""
    if ratio < 0:
        raise DataError(f"replay ratio must be >= 0, got {ratio}")
    rng = random.Random(seed)
    wanted = round(ratio * len(records))
    if wanted and not replay:
        raise DataError("replay_ratio > 0 but no replay data was given; set replay_data or replay_ratio=0")
    chosen: list[TrainingRecord] = []
    while len(chosen) < wanted:
        pool = list(replay)
        rng.shuffle(pool)
        chosen.extend(pool[: wanted - len(chosen)])
    mixed = list(records) + chosen
    rng.shuffle(mixed)
    return mixed


# ----------------------------------------------------------------------------------------------
# Visual inputs (with a render cache for CT studies and rasters)


# The render options each kind of source reads; a cached rendering is keyed by these alone, so a CT-only
# option (``window``) leaves cached satellite tiles valid and a tiling option leaves CT slices valid.
CT_RENDER_OPTIONS = ("num_slices", "spacing_mm", "window", "size")
CT_LOAD_OPTIONS = ("ct_rate_metadata",)
RASTER_RENDER_OPTIONS = ("tile_size", "max_tiles", "tile_labels")


def render_options(record: TrainingRecord) -> dict:
    """The part of ``record.render`` its renderer reads (CT: slicing + loading options; raster: tiling).

    ``tile_labels: false`` is left out, so it keys the same cached rendering as no option at all."""
    names = CT_RENDER_OPTIONS + CT_LOAD_OPTIONS if record.ct is not None else RASTER_RENDER_OPTIONS
    options = {name: record.render[name] for name in names if name in record.render}
    if not options.get("tile_labels", True):
        del options["tile_labels"]
    return options


def _cache_key(source: Path, options: dict) -> str:
    stat = source.stat()
    blob = json.dumps([str(source.resolve()), stat.st_size, stat.st_mtime_ns, options], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def _write_cache(folder: Path, images: Sequence, prompt: str) -> Visuals:
    """Write one rendering into ``folder`` through a folder of this writer's own, moved into place at the end.

    Processes that share a cache (trainings, evaluations and probes side by side) may render the same
    study at once: each writes apart, the first move wins and the others, whose renderings are the same
    (rendering is deterministic), drop theirs and read the winner's."""
    tmp = folder.with_name(f"{folder.name}.{uuid.uuid4().hex}.tmp")  # the umask's permissions, as the cache's
    tmp.mkdir(parents=True)
    paths = []
    for index, image in enumerate(images):
        target = tmp / f"{index:05d}.png"
        image.convert("RGB").save(target)
        paths.append(folder / target.name)
    (tmp / "meta.json").write_text(json.dumps({"prompt": prompt, "count": len(paths)}))
    try:
        tmp.replace(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        written = _read_cache(folder)
        if written is None:
            raise
        return written
    return Visuals(tuple(paths), prompt)


def _read_cache(folder: Path) -> Visuals | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return Visuals(tuple(folder / f"{i:05d}.png" for i in range(meta["count"])), meta["prompt"])


def _render_ct(record: TrainingRecord) -> tuple[list, str]:
    from domain_data.medical.ct import load_ct
    from domain_data.medical.slices import ct_to_slices

    options = {k: v for k, v in record.render.items() if k in CT_RENDER_OPTIONS}
    volume = load_ct(record.ct, ct_rate_metadata=record.render.get("ct_rate_metadata"))
    result = ct_to_slices(volume, **options)
    return list(result.images), result.prompt


def _render_raster(record: TrainingRecord) -> tuple[list, str]:
    from domain_data.remote_sensing.tiling import tile_image

    options = render_options(record)
    with tile_image(record.raster, **options) as tiled:
        return list(tiled.images()), tiled.prompt


def record_visuals(record: TrainingRecord, cache_dir: str | Path | None = None) -> Visuals:
    """Image files in model order plus their protocol text; CT studies / rasters rendered (cached)."""
    if record.ct is None and record.raster is None:
        for path in record.images:
            if not path.is_file():
                raise DataError(f"{record.where}: image {path} not found; fix the path or set image_root")
        if not record.images:
            return Visuals((), "")
        grid = record.grid if record.layout == "grid" else None
        try:
            prompt = protocol.visual_prompt(record.layout, len(record.images), grid,  # type: ignore[arg-type]
                                            tile_labels=bool(record.render.get("tile_labels")))
        except ValueError as error:
            raise DataError(f"{record.where}: {error}") from None
        return Visuals(record.images, prompt)
    source = record.ct if record.ct is not None else record.raster
    assert source is not None
    if not source.exists():
        kind = "CT study" if record.ct is not None else "raster"
        raise DataError(f"{record.where}: {kind} {source} not found; fix the path or set image_root")
    if cache_dir is None:
        raise DataError(f"{record.where}: CT / raster records need an image cache folder (cache_dir)")
    folder = Path(cache_dir) / _cache_key(source, render_options(record))
    cached = _read_cache(folder)
    if cached is not None:
        return cached
    images, prompt = _render_ct(record) if record.ct is not None else _render_raster(record)
    return _write_cache(folder, images, prompt)


# ----------------------------------------------------------------------------------------------
# Conversation -> messages with the visual prompt in place


def to_messages(record: TrainingRecord, visuals: Visuals, require_answer: bool = True) -> list[dict]:
    """Chat messages ``[{role, content}]`` with the protocol's image markup in the human turns.

    ``require_answer=False`` accepts question-only records (evaluation prompts)."""
    messages = [{"role": ROLE_OF[turn["from"]], "content": turn["value"]} for turn in record.conversations]
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where}: no assistant ('gpt') turn: nothing to train on")
    n_images = len(visuals.paths)
    placed = sum(protocol.count_images(m["content"]) for m in messages if m["role"] == "user")
    if any(protocol.count_images(m["content"]) for m in messages if m["role"] != "user"):
        raise DataError(f"{record.where}: <image> appears outside a human turn; move it into the question")
    if placed == 0:
        if n_images:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise DataError(f"{record.where}: images given but no human turn to attach them to")
            first_user["content"] = visuals.prompt + "\n" + first_user["content"]
        return messages
    already_marked = any(IMG_START in m["content"] for m in messages if m["role"] == "user")
    if already_marked:
        if placed != n_images:
            raise DataError(f"{record.where}: text has {placed} <image> placeholders but {n_images} images")
        return messages
    if record.layout == "images" and placed == n_images:
        for m in messages:
            if m["role"] == "user":
                m["content"] = m["content"].replace(IMAGE_TOKEN, protocol.image_block())
        return messages
    if record.layout in ("series", "grid") and placed == 1:
        for m in messages:
            if m["role"] == "user":
                m["content"] = m["content"].replace(IMAGE_TOKEN, visuals.prompt)
        return messages
    expected = "one per image" if record.layout == "images" else "exactly one (it stands for the whole block)"
    raise DataError(
        f"{record.where}: {placed} <image> placeholders for {n_images} images with layout "
        f"{record.layout!r}; expected {expected}, or none to let the protocol place them"
    )


# ----------------------------------------------------------------------------------------------
# Tokenization


class ConversationEncoder:
    """Messages -> ids and labels with a HF (fast) tokenizer whose chat template is the protocol's."""

    def __init__(self, tokenizer: Any, tokens_per_image: int, max_length: int | None = None,
                 image_token: str = IMAGE_TOKEN) -> None:
        if tokens_per_image < 1:
            raise DataError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise DataError(f"tokenizer has no {image_token!r} token; build it with longllava.tokenizer")
        self.image_token_id = int(image_token_id)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_messages(self, messages: list[dict], where: str = "") -> tuple[list[int], list[int]]:
        """Ids and labels before image expansion; raises when pieces and whole text disagree."""
        segments = protocol.render_conversation(messages)
        rendered = "".join(s.text for s in segments)
        if getattr(self.tokenizer, "chat_template", None):
            templated = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if templated != rendered:
                raise DataError(
                    f"{where}: the tokenizer's chat template renders this conversation differently from "
                    "longllava.protocol; use a tokenizer built with longllava.tokenizer (protocol template)"
                )
        input_ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            ids = self._ids(segment.text)
            input_ids.extend(ids)
            labels.extend(ids if segment.is_target else [IGNORE_INDEX] * len(ids))
        if input_ids != self._ids(rendered):
            raise DataError(
                f"{where}: tokenizing the answer separately gives different tokens than the whole "
                "conversation (a merge across a turn boundary); this record cannot be supervised exactly"
            )
        return input_ids, labels

    def expand_images(self, input_ids: list[int], labels: list[int], n_images: int, where: str
                      ) -> tuple[list[int], list[int]]:
        """Each image token -> ``tokens_per_image`` copies (never targets); counts must match."""
        found = input_ids.count(self.image_token_id)
        if found != n_images:
            raise DataError(f"{where}: {found} image tokens after tokenization but {n_images} images")
        out_ids: list[int] = []
        out_labels: list[int] = []
        for token, label in zip(input_ids, labels):
            if token == self.image_token_id:
                out_ids.extend([token] * self.tokens_per_image)
                out_labels.extend([IGNORE_INDEX] * self.tokens_per_image)
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels

    def encode(self, record: TrainingRecord, visuals: Visuals) -> EncodedSample:
        messages = to_messages(record, visuals)
        ids, labels = self.encode_messages(messages, record.where)
        ids, labels = self.expand_images(ids, labels, len(visuals.paths), record.where)
        if self.max_length is not None and len(ids) > self.max_length:
            raise DataError(
                f"{record.where}: {len(ids)} tokens exceed max_length={self.max_length}; raise max_length "
                "or give fewer images (render.num_slices / render.max_tiles)"
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{record.where}: the assistant answer is empty; nothing to supervise")
        return EncodedSample(record.id, ids, labels, list(visuals.paths))


# ----------------------------------------------------------------------------------------------
# Packing, datasets and the collator


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices, in order, into packs whose total length stays within ``max_length``
    (next-fit: a sample that does not fit closes the pack). Order-preserving and deterministic."""
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if length > max_length:
            raise DataError(f"sample {index} has {length} tokens > max_length={max_length}")
        if current and used + length > max_length:
            packs.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        packs.append(current)
    return packs


def concat_samples(samples: Sequence[EncodedSample]) -> dict:
    """One packed example: ids, labels, per-sample restarting position ids, images in order."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    paths: list[Path] = []
    for sample in samples:
        input_ids.extend(sample.input_ids)
        labels.extend(sample.labels)
        position_ids.extend(range(len(sample.input_ids)))
        paths.extend(sample.image_paths)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "image_paths": paths,
            "sample_lengths": [len(s) for s in samples]}


ImageLoader = Callable[[Sequence[Path]], Any]


def processor_image_loader(image_processor: Any) -> ImageLoader:
    """Image files -> pixel tensor (n, 3, H, W) with a HF image processor."""
    from PIL import Image

    def load(paths: Sequence[Path]):
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as error:
                raise DataError(f"image {path} cannot be read ({error}); replace or remove it") from None
        return image_processor(images=images, return_tensors="pt")["pixel_values"]

    return load


class ConversationDataset:
    """A torch-style dataset of (optionally packed) encoded samples; pixels are loaded per item."""

    def __init__(self, samples: Sequence[EncodedSample], image_loader: ImageLoader | None,
                 max_length: int | None = None, pack: bool = False) -> None:
        if pack and max_length is None:
            raise DataError("packing needs max_length")
        self.samples = list(samples)
        self.groups = pack_lengths([len(s) for s in self.samples], max_length) if pack else [
            [i] for i in range(len(self.samples))]
        self.image_loader = image_loader

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict:
        import torch

        item = concat_samples([self.samples[i] for i in self.groups[index]])
        out = {key: torch.tensor(item[key], dtype=torch.long) for key in ("input_ids", "labels", "position_ids")}
        if item["image_paths"]:
            if self.image_loader is None:
                raise DataError("samples have images but the dataset was built without an image loader")
            out["pixel_values"] = self.image_loader(item["image_paths"])
        return out


def encode_records(records: Iterable[TrainingRecord], encoder: ConversationEncoder,
                   cache_dir: str | Path | None = None, progress: bool = False) -> list[EncodedSample]:
    """Render (cached) and tokenize every record; the first bad record raises."""
    items = list(records)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="tokenizing", unit="record")
    return [encoder.encode(record, record_visuals(record, cache_dir)) for record in items]


@dataclass
class Collator:
    """Right-pads ids (``pad_token_id``), labels (-100) and position ids; builds the attention mask;
    concatenates every example's images into one ``pixel_values`` tensor in order."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), longest), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
            "position_ids": torch.zeros((len(features), longest), dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = feature["input_ids"]
            batch["labels"][row, :n] = feature["labels"]
            batch["attention_mask"][row, :n] = 1
            batch["position_ids"][row, :n] = feature.get("position_ids", torch.arange(n))
        pixels = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)  # (total images in batch, 3, H, W)
        return batch
