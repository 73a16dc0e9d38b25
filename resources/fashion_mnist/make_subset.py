"""Rebuild this folder's image subset from Debian's `dataset-fashion-mnist` package.

Takes, for each of the 10 classes, the first 100 images of the official Fashion-MNIST *test*
set (t10k, in file order) and writes them as 28x28 greyscale PNGs named by their test-set index
(`<folder>/t10k_<index>.png`), plus `classes.tsv`. Deterministic: no randomness is involved.

    apt-get install dataset-fashion-mnist
    python resources/fashion_mnist/make_subset.py
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
PER_CLASS = 100

# (folder, name) in Fashion-MNIST label order 0..9; names as in the dataset's README.
CLASSES = (
    ("tshirt_top", "T-shirt/top"),
    ("trouser", "Trouser"),
    ("pullover", "Pullover"),
    ("dress", "Dress"),
    ("coat", "Coat"),
    ("sandal", "Sandal"),
    ("shirt", "Shirt"),
    ("sneaker", "Sneaker"),
    ("bag", "Bag"),
    ("ankle_boot", "Ankle boot"),
)


def read_idx(path: Path, offset: int) -> np.ndarray:
    """Raw uint8 payload of a gzipped idx file (images start at byte 16, labels at byte 8)."""
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def first_per_class(labels: np.ndarray, per_class: int) -> dict[int, np.ndarray]:
    """Indices of the first `per_class` samples of each label, in file order."""
    return {c: np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    labels = read_idx(args.source / "t10k-labels-idx1-ubyte.gz", 8)
    images = read_idx(args.source / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    if len(images) != len(labels):
        raise ValueError(f"{args.source}: {len(images)} images but {len(labels)} labels")

    for label, indices in first_per_class(labels, PER_CLASS).items():
        folder = args.out / CLASSES[label][0]
        folder.mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.fromarray(images[index], mode="L").save(folder / f"t10k_{index:05d}.png", optimize=True)

    rows = ["folder\tname"] + [f"{folder}\t{name}" for folder, name in CLASSES]
    (args.out / "classes.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
