"""Where the manifest's images come from, and reading one image where it lies.

Three layouts (`dataset.format`): an ImageFolder tree (one sub-folder per class); Parquet or
Arrow files with an image column and an integer label column, as Hugging Face `datasets` writes
them; the ImageNet validation layout (one flat folder plus a label file). Each gives, per class
key, the candidate images by name; the name plays the part of the path inside an ImageFolder
class folder, so the same images give the same sample ids and the same split in every layout.
Images are read in place: a Parquet/Arrow image is the bytes of one row, never unpacked to disk.
"""

from __future__ import annotations

import bisect
import csv
import glob
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stagelens.images import ImageSource

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
TABLE_SUFFIXES = (".parquet", ".arrow")
FORMATS = ("imagefolder", "parquet", "imagenet_val")


class DatasetError(ValueError):
    """The dataset cannot give what the config asks for; the message names the class or file."""


@dataclass(frozen=True)
class ImageRef:
    """One image: a file, or row `row` of the Parquet/Arrow file `path` (its `column` holds the image)."""

    path: str
    row: int | None = None
    column: str | None = None


# Candidate images of one dataset: class key -> {name: where the image is}. Keys are in the
# source's natural order (sorted folders or keys, or label order); classes without images are left out.
Candidates = dict[str, dict[str, ImageRef]]


# --- ImageFolder ------------------------------------------------------------------------------


def list_class_folders(root: str | os.PathLike) -> list[str]:
    """Sub-folders of the root (hidden ones excluded), sorted. A folder name that is not UTF-8
    or a link that leads nowhere (dangling, or a loop) is an error, not a class quietly lost."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} is not a directory")
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    bad = [f"{os.fsencode(e.path)!r}: name is not valid UTF-8" for e in entries if not _is_utf8(e.name)]
    bad += [f"{e.path}: symbolic link to nowhere (dangling or a loop)" for e in entries
            if e.is_symlink() and not os.path.exists(e.path)]
    if bad:
        raise DatasetError(f"dataset root {root}: unusable class folder(s):\n  " + "\n  ".join(bad))
    return sorted(e.name for e in entries if e.is_dir())


def _is_utf8(name: str) -> bool:
    """False for a file name with bytes that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_images(class_dir: str | os.PathLike) -> list[str]:
    """Image files under a folder (recursively), as sorted POSIX paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath, name).relative_to(class_dir).as_posix())
    return sorted(found)


def imagefolder_candidates(root: str) -> Candidates:
    """Every class folder's images, named by their path inside the class folder."""
    return {
        folder: {rel: ImageRef(os.path.join(root, folder, rel)) for rel in list_images(os.path.join(root, folder))}
        for folder in list_class_folders(root)
    }


# --- class names of integer labels -----------------------------------------------------------


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class keys by integer label: line i names label i by its first word.

    A plain list of names works, and so does ImageNet's LOC_synset_mapping.txt
    ("n01440764 tench, Tinca tinca" -> n01440764).
    """
    with open(path, encoding="utf-8") as fh:
        names = [line.split()[0] for line in fh if line.strip()]
    if not names:
        raise DatasetError(f"class names file {path} is empty")
    if len(set(names)) != len(names):
        raise DatasetError(f"class names file {path} names a class twice")
    return names


def hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """The ClassLabel names Hugging Face `datasets` stores in a file's schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    feature = json.loads(raw).get("info", {}).get("features", {}).get(label_column, {})
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if names else None


# --- Parquet / Arrow --------------------------------------------------------------------------


def table_files(root: str) -> list[str]:
    """The Parquet/Arrow files of a dataset: one file, every such file under a folder, or a glob."""
    if os.path.isfile(root):
        return [root]
    if os.path.isdir(root):
        files = [
            os.path.join(dirpath, name)
            for dirpath, dirnames, names in os.walk(root)
            for name in names
            if name.endswith(TABLE_SUFFIXES) and not name.startswith(".")
        ]
    else:
        files = [f for f in glob.glob(root, recursive=True) if f.endswith(TABLE_SUFFIXES)]
    if not files:
        raise DatasetError(f"dataset root {root}: no .parquet or .arrow files (a file, a folder or a glob)")
    return sorted(files)


def _open_arrow(path: str) -> pa.Table:
    """An Arrow IPC file or stream (`datasets` cache files are streams), memory-mapped: no copy."""
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _file_schema(path: str) -> pa.Schema:
    return pq.read_schema(path) if path.endswith(".parquet") else _open_arrow(path).schema


def _image_field_kind(schema: pa.Schema, column: str, path: str) -> str:
    """'binary' for a bytes column, 'struct' for {bytes, path} as `datasets` writes an Image feature."""
    if column not in schema.names:
        raise DatasetError(f"{path}: no image column {column!r} (dataset.image_column); columns: {schema.names}")
    kind = schema.field(column).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "binary"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "struct"
    raise DatasetError(f"{path}: image column {column!r} has type {kind}; expected binary or struct<bytes, path>")


def _labels_and_names(path: str, label_column: str, image_column: str) -> tuple[list[int], list[str | None], pa.Schema]:
    """A file's integer labels and its images' stored file names (None where absent), without reading image bytes."""
    schema = _file_schema(path)
    kind = _image_field_kind(schema, image_column, path)
    if label_column not in schema.names:
        raise DatasetError(f"{path}: no label column {label_column!r} (dataset.label_column); columns: {schema.names}")
    if not pa.types.is_integer(schema.field(label_column).type):
        raise DatasetError(f"{path}: label column {label_column!r} has type {schema.field(label_column).type}; expected integers")
    has_path = kind == "struct" and schema.field(image_column).type.get_field_index("path") >= 0
    if path.endswith(".parquet"):
        columns = [label_column] + ([f"{image_column}.path"] if has_path else [])
        table = pq.ParquetFile(path).read(columns=columns)
    else:
        table = _open_arrow(path)
    labels = table.column(label_column).to_pylist()
    if has_path:
        stored = table.column(image_column).combine_chunks().field("path").to_pylist()
    else:
        stored = [None] * len(labels)
    return labels, stored, schema


def table_candidates(
    root: str, image_column: str = "image", label_column: str = "label", class_names: str | None = None
) -> Candidates:
    """Every labelled row of the files, by class key, named by its stored file name.

    The key of label i is line i of `class_names`, else the ClassLabel names in the files'
    metadata. A row's name is the base name of the image's stored path (as an ImageFolder would
    name it), else `<file stem>/<row>`. Rows labelled -1 (`datasets`' "no label") are left out.
    """
    names = read_class_names(class_names) if class_names else None
    candidates: Candidates = {}
    for path in table_files(root):
        labels, stored, schema = _labels_and_names(path, label_column, image_column)
        keys = names or hf_class_names(schema, label_column)
        if keys is None:
            raise DatasetError(f"{path}: no class names in the file's metadata; set dataset.class_names")
        for key in keys:
            candidates.setdefault(key, {})
        stem = Path(path).name.rsplit(".", 1)[0]
        for row, (label, name) in enumerate(zip(labels, stored)):
            if label is None or label < 0:
                continue
            if label >= len(keys):
                raise DatasetError(f"{path}, row {row}: label {label} has no class name (only {len(keys)} names)")
            name = os.path.basename(name) if name else f"{stem}/{row:06d}"
            bucket = candidates[keys[label]]
            if name in bucket:
                raise DatasetError(f"{path}, row {row}: image name {name!r} also in {bucket[name].path} (class {keys[label]!r})")
            bucket[name] = ImageRef(path, row, image_column)
    return {key: images for key, images in candidates.items() if images}  # classes no row carries are not in the dataset


# --- ImageNet validation layout ---------------------------------------------------------------


def read_val_labels(path: str, class_names: str | None = None) -> dict[str, str]:
    """Image stem -> class key from an ImageNet validation label file.

    Either Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the class is the first word
    of the prediction string) or lines "<image file> <class>" where the class is a key (a
    WordNet id) or an integer label indexing `class_names` (0-based, as in Caffe's val.txt).
    """
    names = read_class_names(class_names) if class_names else None
    labels: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        first = fh.readline()
        fh.seek(0)
        if first.startswith("ImageId,"):
            pairs = [(row["ImageId"], row["PredictionString"].split()[0]) for row in csv.DictReader(fh)]
        else:
            pairs = [tuple(line.split()[:2]) for line in fh if line.strip()]
    for i, pair in enumerate(pairs, start=1):
        if len(pair) != 2:
            raise DatasetError(f"label file {path}, entry {i}: expected '<image file> <class>', got {pair!r}")
        image, cls = pair
        if cls.lstrip("-").isdigit():
            if names is None:
                raise DatasetError(f"label file {path} gives integer labels; set dataset.class_names to name them")
            if not 0 <= int(cls) < len(names):
                raise DatasetError(f"label file {path}, entry {i}: label {cls} outside 0..{len(names) - 1}")
            cls = names[int(cls)]
        labels[Path(image).name.split(".")[0]] = cls
    if not labels:
        raise DatasetError(f"label file {path} has no labels")
    return labels


def imagenet_val_candidates(root: str, labels: str, class_names: str | None = None) -> Candidates:
    """The flat folder's labelled images by class key (named by file name, as in a class folder)."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} is not a directory")
    by_stem = read_val_labels(labels, class_names)
    files = {Path(rel).name.split(".")[0]: rel for rel in list_images(root)}
    missing = sorted(set(by_stem) - set(files))
    if missing:
        raise DatasetError(f"label file {labels} names {len(missing)} image(s) missing from {root}: {', '.join(missing[:5])}")
    keys = read_class_names(class_names) if class_names else sorted(set(by_stem.values()))
    candidates: Candidates = {key: {} for key in keys}
    for stem, key in by_stem.items():
        if key not in candidates:
            raise DatasetError(f"label file {labels}: class {key!r} of {stem} is not in {class_names}")
        rel = files[stem]
        candidates[key][Path(rel).name] = ImageRef(os.path.join(root, rel))
    return {key: images for key, images in candidates.items() if images}


def scan_candidates(dataset: dict) -> Candidates:
    """The candidate images of the configured dataset (`dataset.format` picks the layout)."""
    fmt = dataset.get("format", "imagefolder")
    root = dataset["root"]
    if fmt == "imagefolder":
        return imagefolder_candidates(root)
    if fmt == "parquet":
        return table_candidates(root, dataset.get("image_column", "image"), dataset.get("label_column", "label"), dataset.get("class_names"))
    if fmt == "imagenet_val":
        if not dataset.get("labels"):
            raise DatasetError("dataset.format imagenet_val needs dataset.labels (the label file)")
        return imagenet_val_candidates(root, dataset["labels"], dataset.get("class_names"))
    raise DatasetError(f"dataset.format must be one of {', '.join(FORMATS)}; got {fmt!r}")


# --- reading images in place ------------------------------------------------------------------


class _RowGroupCache:
    """The image columns of the last few Parquet row groups (or Arrow files) read, so that
    neighbouring rows cost one read; thread-safe (extraction reads in a worker thread)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.arrays: OrderedDict[tuple[str, str, int], pa.Array] = OrderedDict()
        self.starts: dict[str, list[int]] = {}

    def _group(self, path: str, row: int) -> tuple[int, int]:
        """(row group, its first row) of a Parquet row; Arrow files are one group."""
        if not path.endswith(".parquet"):
            return 0, 0
        if path not in self.starts:
            meta = pq.ParquetFile(path).metadata
            starts = [0]
            for g in range(meta.num_row_groups):
                starts.append(starts[-1] + meta.row_group(g).num_rows)
            self.starts[path] = starts
        starts = self.starts[path]
        group = bisect.bisect_right(starts, row) - 1
        if not 0 <= group < len(starts) - 1:
            raise DatasetError(f"{path}: no row {row} (the file has {starts[-1]}); was it replaced after the manifest was made?")
        return group, starts[group]

    def _read(self, path: str, group: int, column: str) -> pa.Array:
        if path.endswith(".parquet"):
            return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).combine_chunks()
        return _open_arrow(path).column(column).combine_chunks()

    def cell(self, ref: ImageRef) -> dict | bytes | None:
        """The image cell of one row: bytes, or {bytes, path}."""
        assert ref.row is not None and ref.column is not None
        group, first = self._group(ref.path, ref.row)
        key = (ref.path, ref.column, group)
        with self.lock:
            array = self.arrays.get(key)
            if array is not None:
                self.arrays.move_to_end(key)
        if array is None:
            array = self._read(ref.path, group, ref.column)
            with self.lock:
                self.arrays[key] = array
                while len(self.arrays) > self.size:
                    self.arrays.popitem(last=False)
        if ref.row - first >= len(array):
            raise DatasetError(f"{ref.path}: no row {ref.row}; was it replaced after the manifest was made?")
        return array[ref.row - first].as_py()


_CELLS = _RowGroupCache()


def read_image_source(ref: ImageRef) -> ImageSource:
    """What stagelens.images decodes for an image: its file path, or its bytes from a Parquet/Arrow row."""
    if ref.row is None:
        return ref.path
    cell = _CELLS.cell(ref)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):  # `datasets` may store only a path to a local file
            stored = cell["path"]
            return stored if os.path.isabs(stored) else os.path.join(os.path.dirname(ref.path), stored)
        raise DatasetError(f"{ref.path}, row {ref.row}: image cell has neither bytes nor path")
    if not cell:
        raise DatasetError(f"{ref.path}, row {ref.row}: empty image cell")
    return cell


def describe(ref: ImageRef) -> str:
    """How messages name an image."""
    return ref.path if ref.row is None else f"{ref.path} (row {ref.row}, column {ref.column})"


def refs_of(paths: Sequence[str], rows: Sequence[int | None], column: str | None) -> list[ImageRef]:
    """Manifest columns back to image references."""
    return [ImageRef(p, r, column if r is not None else None) for p, r in zip(paths, rows)]
