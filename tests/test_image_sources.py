"""Dataset layouts: Parquet/Arrow shards and the ImageNet validation layout give the same manifest
as the same images in an ImageFolder tree, and their images are read in place."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stagelens.dataset import DatasetError, build_manifest, write_manifest
from stagelens.extract import load_image, read_split
from stagelens.image_sources import ImageRef, read_image_source

CLASSES = ["n01440764", "n01443537", "n01484850"]  # WordNet ids, as ImageNet keys its classes
PER_CLASS = 7
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a `datasets` Image feature


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images() -> list[tuple[str, str, bytes]]:
    """(class key, file name, bytes), interleaved across classes as ImageNet's validation set is."""
    out = []
    for i in range(PER_CLASS * len(CLASSES)):
        out.append((CLASSES[i % len(CLASSES)], f"ILSVRC2012_val_{i + 1:08d}.png", png_bytes(i)))
    return out


def imagefolder(root: Path, images) -> Path:
    for key, name, data in images:
        (root / key).mkdir(parents=True, exist_ok=True)
        (root / key / name).write_bytes(data)
    return root


def hf_metadata(names: list[str]) -> dict:
    """The schema metadata `datasets` writes: the features, with the ClassLabel names."""
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def hf_shards(root: Path, images, n_shards: int = 2, row_group_size: int = 4) -> Path:
    """Parquet shards as `datasets` pushes them: struct image column, int label, several row groups."""
    root.mkdir(parents=True)
    for shard in range(n_shards):
        part = images[shard::n_shards]
        table = pa.table(
            {
                "image": pa.array([{"bytes": d, "path": n} for _, n, d in part], IMAGE_TYPE),
                "label": pa.array([CLASSES.index(k) for k, _, _ in part], pa.int64()),
            }
        ).replace_schema_metadata(hf_metadata(CLASSES))
        pq.write_table(table, root / f"validation-{shard:05d}-of-{n_shards:05d}.parquet", row_group_size=row_group_size)
    return root


def comparable(table: pa.Table) -> list[dict]:
    """The manifest without where the images lie."""
    return table.select(["sample_id", "split", "label", "class_name"]).to_pylist()


def pixels(ref: ImageRef) -> np.ndarray:
    return np.asarray(load_image(ref))


def test_parquet_shards_give_the_imagefolder_manifest(tmp_path, images):
    folder = build_manifest(str(imagefolder(tmp_path / "folder", images)), 0, 3, 2)
    shards = build_manifest(str(hf_shards(tmp_path / "shards", images)), 0, 3, 2, format="parquet")
    assert comparable(shards) == comparable(folder)
    assert shards.num_rows == 15 and set(shards.column("row").to_pylist()) != {None}
    # Every row points at the bytes of the same image as the folder's file.
    for f, s in zip(folder.to_pylist(), shards.to_pylist()):
        ref = ImageRef(s["path"], s["row"], "image")
        assert read_image_source(ref) == Path(f["path"]).read_bytes()


def test_arrow_stream_file_and_bytes_column_with_class_names(tmp_path, images):
    """A `datasets` cache file (Arrow stream) with a plain bytes column, named by a class-names file."""
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("".join(f"{k} some description, with words\n" for k in CLASSES))
    table = pa.table(
        {"img": pa.array([d for _, _, d in images], pa.binary()), "y": [CLASSES.index(k) for k, _, _ in images]}
    )
    arrow = tmp_path / "data-00000-of-00001.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    manifest = build_manifest(str(arrow), 0, 3, 2, format="parquet", image_column="img", label_column="y", class_names=str(names))
    assert manifest.column("class_name").unique().to_pylist() == CLASSES
    by_data = {d: i for i, (_, _, d) in enumerate(images)}
    for row in manifest.to_pylist():
        # Without stored file names the name is "<file stem>/<row>".
        assert row["sample_id"] == f"{row['class_name']}/data-00000-of-00001/{row['row']:06d}"
        data = read_image_source(ImageRef(row["path"], row["row"], "img"))
        assert CLASSES[by_data[data] % len(CLASSES)] == row["class_name"]


def test_imagenet_val_layout_gives_the_imagefolder_manifest(tmp_path, images):
    folder = build_manifest(str(imagefolder(tmp_path / "folder", images)), 0, 3, 2)
    flat = tmp_path / "val"
    flat.mkdir()
    for _, name, data in images:
        (flat / name).write_bytes(data)
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(n).stem},{k} 1 2 30 40 {k} 5 6 7 8\n" for k, n, _ in reversed(images)
    ))
    assert comparable(build_manifest(str(flat), 0, 3, 2, format="imagenet_val", labels=str(kaggle))) == comparable(folder)

    caffe = tmp_path / "val.txt"  # "<file> <0-based label>" with the names in a class-names file
    caffe.write_text("".join(f"{n} {CLASSES.index(k)}\n" for k, n, _ in images))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    manifest = build_manifest(str(flat), 0, 3, 2, format="imagenet_val", labels=str(caffe), class_names=str(names))
    assert comparable(manifest) == comparable(folder)
    assert all(Path(p).parent == flat for p in manifest.column("path").to_pylist())


def test_extraction_reads_parquet_images_in_place(tmp_path, images):
    folder = build_manifest(str(imagefolder(tmp_path / "folder", images)), 0, 3, 2)
    shards = build_manifest(str(hf_shards(tmp_path / "shards", images, n_shards=1, row_group_size=2)), 0, 3, 2, format="parquet")
    write_manifest(folder, tmp_path / "folder.parquet")
    write_manifest(shards, tmp_path / "shards.parquet")
    for split in ("train", "test"):
        from_files = read_split(tmp_path / "folder.parquet", split)
        from_rows = read_split(tmp_path / "shards.parquet", split)
        assert [s.sample_id for s in from_rows] == [s.sample_id for s in from_files]
        assert all(s.row is not None and s.column == "image" for s in from_rows)
        for a, b in zip(from_files, from_rows):
            np.testing.assert_array_equal(pixels(a.image), pixels(b.image))


def test_broken_parquet_image_is_named_or_skipped(tmp_path, images):
    broken = [(k, n, b"not a png" if i == 0 else d) for i, (k, n, d) in enumerate(images)]
    shards = hf_shards(tmp_path / "shards", broken, n_shards=1)
    with pytest.raises(DatasetError, match=r"validation-00000-of-00001.parquet \(row 0, column image\)"):
        build_manifest(str(shards), 0, PER_CLASS - 1, 1, format="parquet")  # every image is needed
    manifest = build_manifest(str(shards), 0, PER_CLASS - 2, 1, format="parquet", on_broken_image="skip")
    assert "n01440764/ILSVRC2012_val_00000001" not in manifest.column("sample_id").to_pylist()
    assert manifest.num_rows == (PER_CLASS - 1) * len(CLASSES)


def test_layout_errors_name_the_key(tmp_path, images):
    shards = hf_shards(tmp_path / "shards", images, n_shards=1)
    with pytest.raises(DatasetError, match="no image column 'picture'"):
        build_manifest(str(shards), 0, 3, 2, format="parquet", image_column="picture")
    table = pq.read_table(next(shards.iterdir())).replace_schema_metadata(None)
    bare = tmp_path / "bare.parquet"
    pq.write_table(table, bare)
    with pytest.raises(DatasetError, match="set dataset.class_names"):
        build_manifest(str(bare), 0, 3, 2, format="parquet")
    with pytest.raises(DatasetError, match="no .parquet or .arrow files"):
        build_manifest(str(tmp_path / "nothing-*.parquet"), 0, 3, 2, format="parquet")
    flat = tmp_path / "val"
    flat.mkdir()
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01440764\n")
    with pytest.raises(DatasetError, match="missing from"):
        build_manifest(str(flat), 0, 3, 2, format="imagenet_val", labels=str(labels))
