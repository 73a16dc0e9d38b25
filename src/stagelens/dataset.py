"""The image manifest: a deterministic per-class train/test split of an image dataset.

The dataset is an ImageFolder tree, Parquet/Arrow files or the ImageNet validation layout
(stagelens.image_sources); the split sees only class keys and image names, so the same images
give the same manifest in every layout.

The split of a class depends only on the seed, the class folder's name and the sorted paths of
its images, never on filesystem listing order or on the other classes, so adding a class to a
dataset leaves every other class's split unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stagelens.atomic import atomic_path
from stagelens.image_sources import Candidates, DatasetError, ImageRef, describe, read_image_source, scan_candidates
from stagelens.images import image_error
from stagelens.store import METADATA_KEY

T = TypeVar("T")
SPLITS = ("train", "test")

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("path", pa.string()),
        ("row", pa.int64()),
    ]
)


@dataclass(frozen=True)
class ImageClass:
    """One class: its folder under the root and its human-readable name."""

    folder: str
    name: str


@dataclass(frozen=True)
class ClassSplit:
    """The images a class contributes to each split, plus the unreadable ones passed over."""

    train: list[str]
    test: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, error)


# --- reading the tree (I/O) ------------------------------------------------------------------


def read_class_list(path: str | os.PathLike) -> list[ImageClass]:
    """Read a TSV with a header holding columns `folder` and `name`; order is kept."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = {"folder", "name"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"class list {path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        classes = [ImageClass(row["folder"].strip(), row["name"].strip()) for row in reader]
    seen: set[str] = set()
    for i, cls in enumerate(classes, start=2):
        if not cls.folder:
            raise DatasetError(f"class list {path}, line {i}: empty folder")
        if cls.folder in seen:
            raise DatasetError(f"class list {path}, line {i}: folder {cls.folder!r} listed twice")
        seen.add(cls.folder)
    if not classes:
        raise DatasetError(f"class list {path} lists no classes")
    return classes


def ref_error(ref: ImageRef) -> str | None:
    """stagelens.images.image_error of an image wherever it lies (file or Parquet/Arrow row)."""
    try:
        error = image_error(read_image_source(ref))
    except (OSError, DatasetError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return error if error is None or ref.row is None else f"{describe(ref)}: {error}"


# --- pure logic ------------------------------------------------------------------------------


def choose_classes(folders: Sequence[str], class_list: Sequence[ImageClass] | None) -> list[ImageClass]:
    """The ordered classes: the class list (every folder must exist), else the folders in the source's order.

    A listed folder also matches one on-disk folder named "<folder>-<anything>", so Stanford
    Dogs (`n02085620-Chihuahua/`) works with the same WordNet-id list as ImageNet (`n02085620/`).
    """
    if class_list is None:
        return [ImageClass(folder, folder) for folder in folders]
    present = set(folders)
    chosen: list[ImageClass] = []
    absent: list[str] = []
    for cls in class_list:
        if cls.folder in present:
            chosen.append(cls)
            continue
        prefixed = sorted(f for f in folders if f.startswith(f"{cls.folder}-"))
        if len(prefixed) > 1:
            raise DatasetError(f"class list folder {cls.folder!r} matches several folders: {', '.join(prefixed)}")
        if prefixed:
            chosen.append(ImageClass(prefixed[0], cls.name))
        else:
            absent.append(cls.folder)
    if absent:
        shown = ", ".join(absent[:5]) + (f" (+{len(absent) - 5} more)" if len(absent) > 5 else "")
        raise DatasetError(f"class list names {len(absent)} folder(s) missing from the dataset root: {shown}")
    return chosen


def candidate_order(files: Sequence[str], folder: str, seed: int) -> list[str]:
    """A seeded permutation of a class's sorted files, keyed by the class folder's name."""
    digest = hashlib.sha256(folder.encode("utf-8")).digest()
    key = [seed, *struct.unpack("<4I", digest[:16])]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    ordered = sorted(files)
    return [ordered[i] for i in rng.permutation(len(ordered))]


def split_class(
    cls: ImageClass,
    files: Sequence[str],
    seed: int,
    n_train: int,
    n_test: int,
    error_of: Callable[[str], str | None],
) -> ClassSplit:
    """Take readable images in candidate order: the first n_train go to train, the next n_test to test.

    `error_of(relative path)` says why an image is unreadable (None when fine); only as many
    images are checked as the split needs. Unreadable ones are passed over for the next
    candidate and recorded; whether that is an error is the caller's choice (`build_manifest`).
    """
    need = n_train + n_test
    if len(files) < need:
        raise DatasetError(
            f"class {cls.folder!r} ({cls.name}) has {len(files)} images, needs {need} "
            f"(train_per_class={n_train} + test_per_class={n_test})"
        )
    chosen: list[str] = []
    skipped: list[tuple[str, str]] = []
    for rel in candidate_order(files, cls.folder, seed):
        if len(chosen) == need:
            break
        error = error_of(rel)
        if error is None:
            chosen.append(rel)
        else:
            skipped.append((rel, error))
    return ClassSplit(train=chosen[:n_train], test=chosen[n_train:], skipped=skipped)


def check_splits(
    classes: Sequence[ImageClass], splits: Mapping[str, ClassSplit], n_train: int, n_test: int, on_broken_image: str
) -> None:
    """One error for the whole dataset: every unreadable image met (on_broken_image="error"),
    else every class left with too few readable images."""
    broken = [f"{cls.folder}/{rel}: {error}" for cls in classes for rel, error in splits[cls.folder].skipped]
    if broken and on_broken_image == "error":
        raise DatasetError(
            f"{len(broken)} unreadable image(s); replace them, or set dataset.on_broken_image: skip to pass over them "
            "(removing them redraws the split):\n" + "\n".join(f"unreadable image {line}" for line in broken)
        )
    need = n_train + n_test
    short = []
    for cls in classes:
        split = splits[cls.folder]
        readable = len(split.train) + len(split.test)
        if readable < need:  # then every file of the class was checked
            short.append(f"class {cls.folder!r} ({cls.name}) has {readable + len(split.skipped)} images of which "
                         f"{len(split.skipped)} are unreadable; needs {need} readable")
    if short:
        raise DatasetError("\n".join(short) + f" (train_per_class={n_train} + test_per_class={n_test})")


def sample_id(folder: str, rel: str) -> str:
    """Stable id of an image: `<class folder>/<path inside it without suffix>`."""
    return f"{folder}/{Path(rel).with_suffix('').as_posix()}"


def manifest_table(
    classes: Sequence[ImageClass],
    splits: Mapping[str, ClassSplit],
    refs: Mapping[str, Mapping[str, ImageRef]],
    metadata: Mapping[str, object],
) -> pa.Table:
    """The manifest rows (train then test, by label, by sample id) with the run metadata attached.

    `path` is the image file, or the Parquet/Arrow file whose row `row` holds the image.
    """
    columns: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
    for split in SPLITS:
        for label, cls in enumerate(classes):
            files = getattr(splits[cls.folder], split)
            for rel in sorted(files, key=lambda r: sample_id(cls.folder, r)):
                ref = refs[cls.folder][rel]
                columns["sample_id"].append(sample_id(cls.folder, rel))
                columns["split"].append(split)
                columns["label"].append(label)
                columns["class_name"].append(cls.name)
                columns["path"].append(ref.path)
                columns["row"].append(ref.row)
    dupes = sorted(i for i, n in Counter(columns["sample_id"]).items() if n > 1)
    if dupes:
        raise DatasetError(f"images share a sample id (same name, different suffix): {', '.join(dupes[:5])}")
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(dict(metadata), sort_keys=True).encode("utf-8")})


def first_candidates(classes: Sequence[ImageClass], candidates: Candidates, seed: int, need: int) -> list[ImageRef]:
    """The images the split checks first (the first `need` of each class), in storage order, so
    that checking them reads each Parquet row group once."""
    refs = [
        candidates[cls.folder][rel]
        for cls in classes
        for rel in candidate_order(list(candidates[cls.folder]), cls.folder, seed)[:need]
    ]
    return sorted(refs, key=lambda r: (r.path, -1 if r.row is None else r.row))


# --- orchestration and writing ---------------------------------------------------------------


def build_manifest(
    root: str,
    seed: int,
    train_per_class: int,
    test_per_class: int,
    class_list: str | None = None,
    on_broken_image: str = "error",
    *,
    format: str = "imagefolder",
    image_column: str = "image",
    label_column: str = "label",
    class_names: str | None = None,
    labels: str | None = None,
    error_of: Callable[[ImageRef], str | None] = ref_error,
    progress: Callable[[Iterable[T]], Iterable[T]] = lambda it: it,
) -> pa.Table:
    """Scan the dataset, split every class and return the manifest table.

    format / image_column / label_column / class_names / labels are the `dataset` config keys
    of the same names (config/README.md); `progress` wraps the images checked.
    """
    if on_broken_image not in ("error", "skip"):
        raise DatasetError(f"on_broken_image must be 'error' or 'skip', got {on_broken_image!r}")
    dataset = {"format": format, "root": root, "image_column": image_column, "label_column": label_column,
               "class_names": class_names, "labels": labels}
    candidates = scan_candidates(dataset)
    listed = read_class_list(class_list) if class_list else None
    classes = choose_classes(list(candidates), listed)
    if not classes:
        raise DatasetError(f"dataset root {root} has no classes")
    first = first_candidates(classes, candidates, seed, train_per_class + test_per_class)
    errors = {ref: error_of(ref) for ref in progress(first)}
    splits: dict[str, ClassSplit] = {}
    for cls in classes:
        refs = candidates[cls.folder]
        splits[cls.folder] = split_class(
            cls,
            list(refs),
            seed,
            train_per_class,
            test_per_class,
            lambda rel, refs=refs: errors[refs[rel]] if refs[rel] in errors else error_of(refs[rel]),
        )
    check_splits(classes, splits, train_per_class, test_per_class, on_broken_image)
    skipped = [
        {"path": describe(candidates[folder][rel]), "error": error}
        for folder, split in splits.items()
        for rel, error in split.skipped
    ]
    metadata = {
        **dataset,
        "image_column": image_column if format == "parquet" else None,
        "class_list": class_list,
        "seed": seed,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "on_broken_image": on_broken_image,
        "classes": [{"label": i, "folder": c.folder, "name": c.name} for i, c in enumerate(classes)],
        "counts": {c.folder: {"train": len(splits[c.folder].train), "test": len(splits[c.folder].test)} for c in classes},
        "n_skipped_broken": len(skipped),
        "skipped_broken": skipped,
    }
    return manifest_table(classes, splits, candidates, metadata)


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write atomically (temporary file, then rename) so a killed job leaves no half manifest."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def manifest_from_config(dataset: Mapping, seed: int, progress: Callable[[Iterable[T]], Iterable[T]] = lambda it: it) -> pa.Table:
    """The manifest the validated `dataset` config section describes."""
    keys = ("class_list", "on_broken_image", "format", "image_column", "label_column", "class_names", "labels")
    return build_manifest(dataset["root"], seed, dataset["train_per_class"], dataset["test_per_class"],
                          progress=progress, **{key: dataset[key] for key in keys})


def manifest_report(table: pa.Table, meta: Mapping) -> list[str]:
    """Log lines for a written manifest: its size and every broken image it skipped."""
    lines = [f"{len(meta['classes'])} classes, {table.num_rows} images; skipped {meta['n_skipped_broken']} broken image(s)"]
    return lines + [f"skipped broken image {item['path']}: {item['error']}" for item in meta["skipped_broken"]]


def manifest_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata a manifest carries (seed, classes, counts, skipped images)."""
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise DatasetError(f"{path} has no stagelens metadata; is it a manifest?")
    return json.loads(meta[METADATA_KEY])
