"""load_model / save_random_model: round trip and one-line errors for bad model folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from longllava import loading, protocol
from longllava.errors import ModelInputError
from longllava.loading import load_model


def test_load_model_round_trip(tiny_model, tiny_processor, tiny_model_dir, images_factory):
    model, processor = load_model(tiny_model_dir)
    assert not model.training and model.dtype == torch.float32
    inputs = processor(text=protocol.images_prompt(2) + "Q", images=images_factory(2))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, tiny_model(**inputs).logits, rtol=0, atol=0)


def test_load_model_in_bf16(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bf16")
    assert model.dtype == torch.bfloat16


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_folder", "does not exist"),
        ("no_config", "has no config.json"),
        ("unknown_type", "model_type 'bert', expected 'longllava'"),
        ("upstream_type", "convert-upstream"),
        ("no_weights", "no model.safetensors"),
        ("no_tokenizer", "has no tokenizer"),
        ("trainer_checkpoint", "Trainer checkpoint, which holds no tokenizer: .*model"),
        ("partial_weights", "lacks .* weights"),
        ("corrupt_weights", "cannot load the model"),
        ("bad_config_value", "pooled_grid must be a positive integer"),
        ("bad_dtype", "unknown dtype"),
    ],
)
def test_bad_model_folders_are_one_line_errors(tiny_model_dir, tmp_path, breakage, message):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    dtype = None
    if breakage == "missing_folder":
        folder = tmp_path / "nowhere"
    elif breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage in ("unknown_type", "upstream_type"):
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "bert" if breakage == "unknown_type" else "llava_jamba"
        (folder / "config.json").write_text(json.dumps(config))
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage in ("no_tokenizer", "trainer_checkpoint"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
        if breakage == "trainer_checkpoint":
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    elif breakage == "partial_weights":
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        dropped = {k: v for k, v in weights.items() if "multi_modal_projector" not in k}
        save_file(dropped, folder / "model.safetensors", metadata={"format": "pt"})
    elif breakage == "corrupt_weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:1000])
    elif breakage == "bad_config_value":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "pooled_grid": "x"}))
    elif breakage == "bad_dtype":
        dtype = "int3"
    with pytest.raises(ModelInputError, match=message) as raised:
        load_model(folder, dtype=dtype)
    assert "\n" not in str(raised.value)
    if breakage not in ("bad_dtype",):
        assert str(folder) in str(raised.value)


def test_demo_name_without_built_demo_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "DEMO_DIR", tmp_path / "checkpoints" / "demo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelInputError, match="demo model is not built yet"):
        load_model("demo")
