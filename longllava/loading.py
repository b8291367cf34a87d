"""Load a LongLLaVA model folder (config + safetensors + tokenizer + processor), or build a random one.

A model folder is what ``save_pretrained`` writes for :class:`LongLlavaForConditionalGeneration`
plus :class:`LongLlavaProcessor`: ``config.json`` (``model_type: longllava``), ``model.safetensors``
(or a sharded index), ``tokenizer.json``/``tokenizer_config.json``, ``processor_config.json``.
Everything is local: nothing is downloaded. Every problem with a folder is a one-line
:class:`ModelInputError` that names the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from longllava.config import LongLlavaConfig
from longllava.errors import ModelInputError

DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).resolve().parent / "checkpoints" / "demo"
DEMO_BUILD_HINT = "build it with `longllava finetune demo` (see README), or pass --model with a model folder"

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp32"``/``"fp16"`` (or a torch dtype, or None) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelInputError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_model_dir(model: str | Path) -> Path:
    """``"demo"`` -> the bundled checkpoint folder; anything else is a local folder path."""
    if str(model) == DEMO_NAME and not Path(model).exists():
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelInputError(f"the demo model is not built yet ({DEMO_DIR} is missing): {DEMO_BUILD_HINT}")
        return DEMO_DIR
    return Path(model).expanduser()


def check_model_dir(folder: Path) -> dict[str, Any]:
    """Validate a model folder's layout and config type; returns the parsed config.json."""
    if not folder.exists():
        raise ModelInputError(f"model folder {folder} does not exist: pass a folder written by save_pretrained")
    if not folder.is_dir():
        raise ModelInputError(f"model path {folder} is a file, not a folder: pass the folder that holds config.json")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelInputError(f"{folder} has no config.json: not a model folder")
    try:
        config_dict = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelInputError(f"{config_path} is not valid JSON ({error})") from None
    model_type = config_dict.get("model_type")
    if model_type == "llava_jamba":
        raise ModelInputError(
            f"{folder} is an upstream LongLLaVA checkpoint (model_type llava_jamba): convert it first with "
            f"`longllava convert-upstream {folder} OUT_DIR`"
        )
    if model_type != LongLlavaConfig.model_type:
        raise ModelInputError(
            f"{config_path} has model_type {model_type!r}, expected 'longllava': this folder is not a LongLLaVA model"
        )
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        raise ModelInputError(f"{folder} has no model.safetensors (or sharded index): the weights are missing")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        if (folder / "trainer_state.json").is_file():
            raise ModelInputError(
                f"{folder} is a Trainer checkpoint, which holds no tokenizer: pass its run's exported folder "
                f"({folder.parent / 'model'}), or copy that folder's files but model.safetensors beside these weights"
            )
        raise ModelInputError(f"{folder} has no tokenizer (tokenizer.json): save the tokenizer with the model")
    return config_dict


def load_model(
    model: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load ``(LongLlavaForConditionalGeneration, LongLlavaProcessor)`` from a local folder (or ``"demo"``).

    The model is in eval mode on ``device``; ``dtype`` defaults to the dtype stored in the folder.
    Weights missing from the checkpoint (or extra ones) are an error, not a silent random init.
    """
    from longllava.modeling import LongLlavaForConditionalGeneration

    folder = resolve_model_dir(model)
    check_model_dir(folder)
    torch_dtype = resolve_dtype(dtype)
    try:
        loaded, info = LongLlavaForConditionalGeneration.from_pretrained(
            folder, dtype=torch_dtype if torch_dtype is not None else "auto", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelInputError(f"cannot load the model in {folder}: {first_line}") from None
    _check_loading_info(folder, info)
    processor = load_processor(folder, loaded.config)
    return loaded.to(device).eval(), processor


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing:
        raise ModelInputError(
            f"{folder}: the checkpoint lacks {len(missing)} weights (e.g. {missing[0]}): the weights are incomplete"
        )
    if unexpected:
        raise ModelInputError(
            f"{folder}: the checkpoint has {len(unexpected)} weights the model does not use (e.g. {unexpected[0]})"
        )
    if mismatched:
        raise ModelInputError(f"{folder}: {len(mismatched)} weights have shapes that do not match config.json")


def load_processor(folder: str | Path, config: LongLlavaConfig | None = None) -> Any:
    """The processor saved in ``folder``; rebuilt from the tokenizer + config if processor_config.json is absent."""
    from transformers import AutoTokenizer

    from longllava.processor import LongLlavaProcessor

    folder = Path(folder)
    if config is None:
        check_model_dir(folder)
        config = LongLlavaConfig.from_pretrained(folder)
    if (folder / "processor_config.json").is_file():
        processor = LongLlavaProcessor.from_pretrained(folder)
    else:
        processor = LongLlavaProcessor.from_config(config, AutoTokenizer.from_pretrained(folder))
    if processor.tokens_per_image != config.tokens_per_image or processor.image_token_id != config.image_token_id:
        raise ModelInputError(
            f"{folder}: processor ({processor.tokens_per_image} tokens per image, <image> id "
            f"{processor.image_token_id}) does not match config.json ({config.tokens_per_image}, "
            f"{config.image_token_id})"
        )
    return processor


def build_model(
    preset: str | LongLlavaConfig, tokenizer: Any, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """A randomly initialised model for ``preset`` sized to ``tokenizer``, and its processor.

    The Mamba layers get Mamba's time-step init (:func:`longllava.modeling.init_mamba_time_steps`).

    The text vocabulary becomes ``len(tokenizer)`` rounded up to a multiple of 64; pad/bos/eos and the
    image token id follow the tokenizer.
    """
    from longllava.modeling import LongLlavaForConditionalGeneration, init_mamba_time_steps
    from longllava.processor import LongLlavaProcessor

    config = LongLlavaConfig.from_preset(preset) if isinstance(preset, str) else preset
    text = config.text_config
    text.vocab_size = -(-len(tokenizer) // 64) * 64
    text.pad_token_id = tokenizer.pad_token_id
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    model = LongLlavaForConditionalGeneration(config)
    init_mamba_time_steps(model, seed=seed)  # transformers' Jamba init leaves the Mamba layers a few tokens' memory
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, LongLlavaProcessor.from_config(config, tokenizer)


def save_random_model(
    preset: str | LongLlavaConfig,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer: Any = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a random-weight model folder (weights + tokenizer + processor) for tests and benchmarks.

    Without ``tokenizer``, one is trained by :func:`longllava.tokenizer.build_tokenizer` on its built-in
    corpus with at most ``vocab_size`` tokens (default: the preset's text vocabulary, e.g. 4096 for demo);
    pass ``tokenizer=build_tokenizer(texts=...)`` to include your training texts.
    """
    from longllava.tokenizer import build_tokenizer

    config = LongLlavaConfig.from_preset(preset) if isinstance(preset, str) else preset
    if tokenizer is None:
        tokenizer = build_tokenizer(vocab_size=vocab_size or config.text_config.vocab_size)
    model, processor = build_model(config, tokenizer, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
