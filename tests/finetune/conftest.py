"""Fixtures for the fine-tuning tests: a seeded tiny base model and seeded synthetic data on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random-weight tiny-preset model folder (seed 0), written once per session."""
    from longllava.loading import save_random_model

    return save_random_model("tiny", tmp_path_factory.mktemp("tiny_base") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_base):
    from longllava.loading import load_model

    return load_model(tiny_base)[1]


def write_colour_set(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """``n`` records: one flat-colour image each (with seeded noise), asked for its colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 8, (56, 56, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        records.append({"id": f"colour-{i}", "image": f"img{i:02d}.png", "conversations": [
            {"from": "human", "value": "What colour is the image?"},
            {"from": "gpt", "value": f"The image is {name}."}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def colour_set(tmp_path_factory) -> Path:
    return write_colour_set(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def synthetic_sets(tmp_path_factory) -> Path:
    """The project's seeded synthetic sets, shrunk: CT phantoms (series), satellite scenes (grid), NIAH."""
    from domain_data.synthetic.build import build_synthetic_sets

    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic_sets(out, seed=0, n_ct_train=2, n_ct_test=1, n_rs_train=2, n_rs_test=1, ct_size=64,
                         ct_slices=(16, 16), rs_sizes=((224, 224),), tile_size=112, dicom_every=2,
                         n_niah=2, niah_images=4, niah_size=56)
    return out


def tiny_recipe(train_data: Path | list, output_dir: Path, **overrides):
    """A fast CPU recipe for the tiny preset."""
    from finetune.train import Recipe

    values = dict(name="test", base_model="preset:tiny", mode="lora", stage="sft",
                  train_data=[str(p) for p in (train_data if isinstance(train_data, list) else [train_data])],
                  output_dir=str(output_dir), max_length=160, pack=True, learning_rate=3e-3, warmup_ratio=0.0,
                  max_steps=4, save_steps=2, per_device_train_batch_size=2, gradient_checkpointing=False, seed=0)
    values.update(overrides)
    recipe = Recipe(**values)
    recipe.validate()
    return recipe


@pytest.fixture(scope="session")
def make_recipe():
    return tiny_recipe


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    """A recipe YAML owned by the tests (the bundled ones change with their projects)."""
    path = tmp_path / "cpu_tiny.yaml"
    path.write_text(
        "description: tiny preset on CPU for the CLI tests\n"
        "base_model: preset:tiny\nmode: full\nstage: sft\ntrain_data: []\n"
        f"output_dir: {tmp_path / 'run'}\nimage_cache_dir: {tmp_path / 'image_cache'}\n"
        "max_length: 160\npack: true\nlearning_rate: 0.003\nwarmup_ratio: 0.0\nmax_steps: 2\n"
        "per_device_train_batch_size: 1\ngradient_checkpointing: false\nprecision: fp32\n"
        "save_steps: 2\nsave_total_limit: 2\nlogging_steps: 1\nseed: 0\n"
    )
    return path
