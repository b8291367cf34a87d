"""Model-core subcommands: ``longllava ask``, ``longllava convert-upstream``, ``longllava plan``.

Registration is cheap (argparse only); torch and transformers are imported inside the commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longllava.errors import ModelInputError


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_ask(subparsers)
    _register_convert(subparsers)
    _register_plan(subparsers)


def _register_ask(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ask",
        help="answer a question about images / video frames with a local model folder",
        description="Answer QUESTION with the model in --model (a folder written by save_pretrained, or "
        "'demo'). --images are separate images (<img><image></img> each); --video-frames are an ordered "
        "series (<vid>...<t>...</vid>). Nothing is downloaded.",
    )
    parser.add_argument(
        "question", nargs="?", default=None, help="the question (it may also come last, after --images PATH...)"
    )
    parser.add_argument("--model", default="demo", help="model folder or 'demo' (default: demo)")
    parser.add_argument("--images", nargs="+", default=[], metavar="PATH", help="image files")
    parser.add_argument("--video-frames", nargs="+", default=[], metavar="PATH", help="frames of one ordered series")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as saved)")
    parser.add_argument("--json", action="store_true", help="print the answer and counts as JSON")
    parser.set_defaults(func=run_ask)


def _register_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-upstream",
        help="convert an original LongLLaVA (llava_jamba) checkpoint into a model folder",
        description="Read SRC (config.json with model_type llava_jamba, safetensors or .bin weights, a "
        "tokenizer) and write DST loadable by `longllava ask --model DST`. Per-expert MoE weights are fused "
        "the way transformers 5 stores them; every tensor is accounted for.",
    )
    parser.add_argument("src", help="upstream checkpoint folder")
    parser.add_argument("dst", help="output folder (must be new or empty)")
    parser.add_argument("--vision-tower", default=None, help="local CLIP folder (default: from mm_vision_tower)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SRC)")
    parser.add_argument("--dtype", default=None, help="store weights as fp32, bf16 or fp16 (default: as in SRC)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    parser.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    parser.set_defaults(func=run_convert)


def _register_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate GPU memory for N images and the largest N that fits",
        description="Weights + KV cache (attention layers only) + Mamba conv/SSM state + activation peak of "
        "a chunked prefill + fixed overhead, for batch size 1. See README (model core) for the formulas.",
    )
    parser.add_argument("--preset", default="9b", help="tiny, demo, 9b or a13b (default: 9b)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GB (default: 80)")
    parser.add_argument("--dtype", default="bf16", help="weight dtype: bf16, fp16, fp32 or int8 (default: bf16)")
    parser.add_argument("--images", type=int, default=1000, help="number of images (default: 1000)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk in tokens; 0 = no chunking")
    parser.add_argument("--text-tokens", type=int, default=512, help="prompt text tokens (default: 512)")
    parser.add_argument("--new-tokens", type=int, default=512, help="generated tokens (default: 512)")
    parser.add_argument("--vision-batch", type=int, default=32, help="images per CLIP batch (default: 32)")
    parser.add_argument("--overhead-gb", type=float, default=1.5, help="CUDA context etc. (default: 1.5)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run_plan)


def build_question_messages(question: str, n_images: int, n_frames: int) -> list[dict[str, str]]:
    """One user turn: separate images, then the ordered series, then ``\\n`` and the question."""
    from longllava import protocol

    visual = ""
    if n_images:
        visual += protocol.images_prompt(n_images)
    if n_frames:
        visual += protocol.series_prompt(n_frames)
    content = f"{visual}\n{question}" if visual else question
    return [{"role": "user", "content": content}]


def read_images(paths: Sequence[str | Path]) -> list[Any]:
    """Open image files as RGB PIL images; a missing or unreadable file is a ModelInputError."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ModelInputError(f"image {path} does not exist")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ModelInputError(f"image {path} cannot be read as an image ({error})") from None
    return images


def generate_answer(model: Any, processor: Any, messages: list[dict], images: list[Any], max_new_tokens: int) -> str:
    """The greedy answer to chat ``messages`` with ``images``, through the long-context session.

    The session encodes images in batches and prefills the prompt in chunks, so a question about
    hundreds of images stays within bounded memory; progress bars show on an interactive terminal.
    """
    import sys

    from longllava.session import LongContextSession

    session = LongContextSession(model, processor, show_progress=sys.stderr.isatty())
    return session.generate(messages, images, max_new_tokens=max_new_tokens).strip()


def _take_question(args: argparse.Namespace) -> str:
    """The question; when written last after ``--images a b`` argparse files it as a path: take it back."""
    question = args.question
    if question is None:
        trailing = [paths for paths in (args.images, args.video_frames) if paths and not Path(paths[-1]).exists()]
        if len(trailing) == 1:
            question = trailing[0].pop()
    if question is None or not question.strip():
        raise ModelInputError('no question given: longllava ask "question" --images PATH...')
    return question


def _quiet_transformers() -> None:
    """No progress bars or kernel-fallback warnings on the command line (errors still show)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_ask(args: argparse.Namespace) -> int:
    import time

    from longllava.cli import print_json
    from longllava.loading import load_model

    if args.max_new_tokens < 1:
        raise ModelInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    args.question = _take_question(args)
    _quiet_transformers()
    images = read_images(args.images) + read_images(args.video_frames)
    messages = build_question_messages(args.question, len(args.images), len(args.video_frames))
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    start = time.perf_counter()
    answer = generate_answer(model, processor, messages, images, args.max_new_tokens)
    seconds = time.perf_counter() - start
    if args.json:
        print_json(
            {
                "answer": answer,
                "model": str(args.model),
                "images": len(args.images),
                "video_frames": len(args.video_frames),
                "image_tokens": len(images) * model.config.tokens_per_image,
                "seconds": round(seconds, 3),
            }
        )
    else:
        print(answer)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from longllava.cli import print_json
    from longllava.loading import resolve_dtype
    from longllava.upstream import convert_upstream

    report = convert_upstream(
        args.src,
        args.dst,
        vision_tower=args.vision_tower,
        tokenizer=args.tokenizer,
        dtype=resolve_dtype(args.dtype),
        overwrite=args.overwrite,
    )
    if args.json:
        print_json(report.to_dict())
    else:
        print(
            f"converted {report.n_source_tensors} tensors from {report.source} into {report.n_written_tensors} "
            f"in {report.destination} ({report.fused_expert_layers} MoE layers fused, {len(report.dropped)} dropped: "
            f"{', '.join(sorted(set(report.dropped.values()))) or 'none'})"
        )
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from longllava.cli import print_json
    from longllava.config import preset_names
    from longllava.planner import format_plan, plan_memory

    if args.preset not in preset_names():
        raise ModelInputError(f"unknown preset {args.preset!r}: choose one of {', '.join(preset_names())}")
    plan = plan_memory(
        args.preset,
        gpu_gb=args.gpu_gb,
        dtype=args.dtype,
        images=args.images,
        chunk_size=args.chunk_size or None,
        text_tokens=args.text_tokens,
        new_tokens=args.new_tokens,
        vision_batch=args.vision_batch,
        overhead_gb=args.overhead_gb,
    )
    if args.json:
        print_json(plan.to_dict())
    else:
        print(format_plan(plan))
    return 0
