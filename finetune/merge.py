"""LoRA adapters: load them onto their base model, or merge them into a plain model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune import FinetuneError


def is_adapter_dir(path: str | Path) -> bool:
    """True for a folder written by ``mode: lora`` training (holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model recorded in the adapter's ``adapter_config.json``."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise FinetuneError(f"{adapter_dir}: no adapter_config.json; pass the 'adapter' folder of a LoRA run")
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise FinetuneError(f"{config_path}: no base_model_name_or_path; pass --base DIR")
    return str(base)


def load_adapter_model(adapter_dir: str | Path, base: str | None = None) -> tuple[Any, Any]:
    """(PeftModel in eval mode, processor): base model + adapter weights (not merged)."""
    from peft import PeftModel

    from longllava.loading import load_model

    base_path = base or adapter_base(adapter_dir)
    if base_path != "demo" and not Path(base_path).exists():
        raise FinetuneError(
            f"{adapter_dir}: base model {base_path} not found; pass --base DIR pointing at the base model"
        )
    model, processor = load_model(base_path)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, processor


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Fold the adapter into the base weights and save a plain model folder (+ processor) to ``out_dir``."""
    model, processor = load_adapter_model(adapter_dir, base)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def load_trained(path: str | Path) -> tuple[Any, Any]:
    """A model folder, ``demo``, or a LoRA adapter folder -> (plain model in eval mode, processor).

    Adapters are loaded onto their base and merged in memory (same outputs, tested; faster, and the
    long-context session needs the plain model)."""
    from longllava.loading import load_model

    if str(path) != "demo" and is_adapter_dir(path):
        model, processor = load_adapter_model(path)
        return model.merge_and_unload().eval(), processor
    model, processor = load_model(str(path))
    model.eval()
    return model, processor
