"""Shared fixtures for the model-core tests: a small trained tokenizer and tiny-preset models (seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longllava.config import LongLlavaConfig
from longllava.loading import build_model, save_random_model
from longllava.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(vocab_size=512)


@pytest.fixture(scope="session")
def tiny_config() -> LongLlavaConfig:
    return LongLlavaConfig.from_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model_and_processor(tokenizer):
    return build_model("tiny", tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_and_processor):
    return tiny_model_and_processor[0]


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return save_random_model("tiny", tmp_path_factory.mktemp("tiny_model"), seed=0, tokenizer=tokenizer)


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (64, 80)) -> list[Image.Image]:
    """``n`` seeded random RGB images (height, width = ``size``)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="session")
def images_factory():
    return make_images


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
