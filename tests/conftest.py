"""Session fixtures: tiny checkpoints of the three real MLLM architectures, and small images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the tests load is built locally

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagelens.builders import PIPELINE_TINY_RECIPES

# (width, height) of the synthetic images: square, wide and tall, so LLaVA-NeXT and Qwen2-VL
# produce different image-token counts and prompts need padding within a batch.
IMAGE_SIZES = ((48, 48), (96, 32), (32, 96), (64, 48), (40, 80), (120, 60), (56, 56))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """recipe -> checkpoint dir of a seeded tiny model (built once per test session)."""
    from stagelens.builders.tiny import build

    root = tmp_path_factory.mktemp("tiny_models")
    return {recipe: build(recipe, root / recipe, seed=0) for recipe in PIPELINE_TINY_RECIPES}


def make_images(directory: Path, n: int, seed: int = 0) -> list[tuple[str, int, str]]:
    """n random RGB PNGs of varied sizes: (sample_id, label, path) per image, 3 labels."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        label = i % 3
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = directory / f"class{label}" / f"img{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        rows.append((f"class{label}/img{i:03d}", label, str(path)))
    return rows


@pytest.fixture(scope="session")
def image_rows(tmp_path_factory) -> list[tuple[str, int, str]]:
    """Seven small synthetic images of varied aspect: (sample_id, label, path)."""
    return make_images(tmp_path_factory.mktemp("images"), 7)
