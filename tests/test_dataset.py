"""The manifest: deterministic per-class splits, class lists, clear errors, broken-image handling."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stagelens.dataset import (
    MANIFEST_SCHEMA,
    DatasetError,
    ImageClass,
    build_manifest,
    candidate_order,
    manifest_metadata,
    split_class,
    write_manifest,
)


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / folder / f"img{i:02d}.png").write_bytes(png_bytes(i))
    return root


def rows(table) -> list[dict]:
    return table.to_pylist()


def per_class(table, split: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in rows(table):
        if row["split"] == split:
            out.setdefault(row["sample_id"].split("/")[0], set()).add(row["sample_id"])
    return out


def manifest_metadata_of(table) -> dict:
    return json.loads(table.schema.metadata[b"stagelens"])


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "images", {"cat": 8, "bird": 8, "dog": 8})


def test_manifest_contract(tree):
    table = build_manifest(str(tree), seed=0, train_per_class=3, test_per_class=2)
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    assert table.num_rows == 3 * 5
    labels = {(r["class_name"], r["label"]) for r in rows(table)}
    assert labels == {("bird", 0), ("cat", 1), ("dog", 2)}  # sorted folder names
    for r in rows(table):
        folder, stem = r["sample_id"].split("/")
        assert r["path"] == os.path.join(str(tree), folder, stem + ".png")
        assert os.path.exists(r["path"])
    train, test = per_class(table, "train"), per_class(table, "test")
    for folder in ("bird", "cat", "dog"):
        assert len(train[folder]) == 3 and len(test[folder]) == 2
        assert not train[folder] & test[folder]
    meta = manifest_metadata_of(table)
    assert meta["seed"] == 0 and meta["train_per_class"] == 3 and meta["test_per_class"] == 2
    assert [c["folder"] for c in meta["classes"]] == ["bird", "cat", "dog"]


def test_same_seed_same_table_other_seed_other_split(tree):
    a = build_manifest(str(tree), seed=0, train_per_class=3, test_per_class=2)
    b = build_manifest(str(tree), seed=0, train_per_class=3, test_per_class=2)
    c = build_manifest(str(tree), seed=1, train_per_class=3, test_per_class=2)
    assert a.equals(b, check_metadata=True)
    assert per_class(a, "train") != per_class(c, "train")


def test_candidate_order_ignores_listing_order():
    files = [f"img{i:02d}.png" for i in range(20)]
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    assert candidate_order(files, "cat", 0) == candidate_order(shuffled, "cat", 0)
    assert sorted(candidate_order(files, "cat", 0)) == files
    # Keyed by the class folder: two classes with the same file names are split differently.
    assert candidate_order(files, "cat", 0) != candidate_order(files, "dog", 0)


def test_adding_a_class_leaves_other_splits_alone(tree):
    before = build_manifest(str(tree), seed=0, train_per_class=3, test_per_class=2)
    make_tree(tree, {"ant": 8})  # sorts first: every other class's label shifts, its images must not
    after = build_manifest(str(tree), seed=0, train_per_class=3, test_per_class=2)
    for split in ("train", "test"):
        old, new = per_class(before, split), per_class(after, split)
        assert set(new) == {"ant", "bird", "cat", "dog"}
        for folder in old:
            assert new[folder] == old[folder]


def test_class_list_restricts_and_orders(tree, tmp_path):
    class_list = tmp_path / "classes.tsv"
    class_list.write_text("folder\tname\ndog\tDomestic dog\ncat\tHouse cat\n")
    table = build_manifest(str(tree), 0, 3, 2, class_list=str(class_list))
    assert {(r["label"], r["class_name"]) for r in rows(table)} == {(0, "Domestic dog"), (1, "House cat")}
    assert not any(r["sample_id"].startswith("bird/") for r in rows(table))
    # The class list changes labels and names, not which images a class contributes.
    plain = build_manifest(str(tree), 0, 3, 2)
    assert per_class(table, "test")["dog"] == per_class(plain, "test")["dog"]
    meta = manifest_metadata_of(table)
    assert [c["folder"] for c in meta["classes"]] == ["dog", "cat"]


def test_class_list_errors_name_the_problem(tree, tmp_path):
    missing = tmp_path / "missing.tsv"
    missing.write_text("folder\tname\ndog\tDog\nn0000\tUnicorn\n")
    with pytest.raises(DatasetError, match="missing from the dataset root: n0000"):
        build_manifest(str(tree), 0, 3, 2, class_list=str(missing))
    no_name = tmp_path / "noname.tsv"
    no_name.write_text("folder\tlabel\ndog\t1\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['name'\]"):
        build_manifest(str(tree), 0, 3, 2, class_list=str(no_name))
    twice = tmp_path / "twice.tsv"
    twice.write_text("folder\tname\ndog\tDog\ndog\tDog again\n")
    with pytest.raises(DatasetError, match="line 3: folder 'dog' listed twice"):
        build_manifest(str(tree), 0, 3, 2, class_list=str(twice))


def test_too_few_images_names_class_and_counts(tmp_path):
    root = make_tree(tmp_path / "images", {"cat": 8, "dog": 4})
    with pytest.raises(DatasetError, match=r"class 'dog' \(dog\) has 4 images, needs 5 \(train_per_class=3 \+ test_per_class=2\)"):
        build_manifest(str(root), 0, 3, 2)


def test_broken_image_error_names_the_file(tmp_path):
    root = make_tree(tmp_path / "images", {"cat": 4})
    (root / "cat" / "img02.png").write_bytes(b"not a png at all")
    # Every image is needed, so the broken one is always reached.
    with pytest.raises(DatasetError, match=r"unreadable image cat/img02\.png: UnidentifiedImageError"):
        build_manifest(str(root), 0, 2, 2)


def test_truncated_image_is_caught_by_the_full_load(tmp_path):
    root = make_tree(tmp_path / "images", {"cat": 4})
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")
    (root / "cat" / "img01.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DatasetError, match=r"unreadable image cat/img01\.png"):
        build_manifest(str(root), 0, 2, 2)


def test_skip_replaces_broken_images_and_counts_them(tmp_path):
    root = make_tree(tmp_path / "images", {"cat": 7, "dog": 5})
    broken = {"img01.png", "img04.png"}
    for name in broken:
        (root / "cat" / name).write_bytes(b"broken")
    # Pick a seed where a readable image comes last, so the split must pass over both broken ones.
    files = sorted(p.name for p in (root / "cat").iterdir())
    seed = next(s for s in range(100) if candidate_order(files, "cat", s)[-1] not in broken)
    table = build_manifest(str(root), seed, 3, 2, on_broken_image="skip")
    cat = per_class(table, "train")["cat"] | per_class(table, "test")["cat"]
    assert cat == {f"cat/{Path(f).stem}" for f in files if f not in broken}
    meta = manifest_metadata_of(table)
    assert meta["n_skipped_broken"] == 2
    assert {Path(item["path"]).name for item in meta["skipped_broken"]} == broken
    assert meta["counts"] == {"cat": {"train": 3, "test": 2}, "dog": {"train": 3, "test": 2}}


def test_skip_still_fails_when_too_few_readable(tmp_path):
    root = make_tree(tmp_path / "images", {"cat": 5})
    (root / "cat" / "img00.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"class 'cat' \(cat\) has 5 images of which 1 are unreadable; needs 5 readable"):
        build_manifest(str(root), 0, 3, 2, on_broken_image="skip")


def test_split_class_checks_only_what_it_needs():
    checked: list[str] = []

    def error_of(rel: str) -> str | None:
        checked.append(rel)
        return None

    files = [f"{i}.png" for i in range(50)]
    split = split_class(ImageClass("c", "c"), files, 0, 3, 2, error_of)
    assert len(checked) == 5
    assert split.train + split.test == candidate_order(files, "c", 0)[:5]


def test_nested_files_and_duplicate_stems(tmp_path):
    root = make_tree(tmp_path / "images", {"cat": 2})
    (root / "cat" / "sub").mkdir()
    (root / "cat" / "sub" / "deep.jpg").write_bytes(png_bytes(9))
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    (root / "cat" / "notes.txt").write_text("ignored")
    table = build_manifest(str(root), 0, 2, 1)
    assert {r["sample_id"] for r in rows(table)} == {"cat/img00", "cat/img01", "cat/sub/deep"}
    (root / "cat" / "img00.jpg").write_bytes(png_bytes(3))
    with pytest.raises(DatasetError, match=r"\(same name, different suffix\): cat/img00"):
        build_manifest(str(root), 0, 3, 1)


def test_write_and_read_back(tree, tmp_path):
    table = build_manifest(str(tree), 0, 3, 2)
    out = tmp_path / "data" / "manifest.parquet"
    write_manifest(table, out)
    assert os.listdir(out.parent) == ["manifest.parquet"]
    assert pq.read_table(out).equals(table)
    meta = manifest_metadata(out)
    assert meta["seed"] == 0 and meta["n_skipped_broken"] == 0
    assert meta["counts"]["cat"] == {"train": 3, "test": 2}


def test_stanford_dogs_folders_match_the_wordnet_id_list(tmp_path):
    """`n02085620-Chihuahua/` (Stanford Dogs) and `n02085620/` (ImageNet) take the same list."""
    class_list = tmp_path / "dogs.tsv"
    class_list.write_text("folder\tname\nn02085620\tChihuahua\nn02085782\tJapanese spaniel\n")
    imagenet = make_tree(tmp_path / "imagenet", {"n02085620": 6, "n02085782": 6, "n09999999": 6})
    stanford = make_tree(tmp_path / "stanford", {"n02085620-Chihuahua": 6, "n02085782-Japanese_spaniel": 6})
    by_id = build_manifest(str(imagenet), 0, 3, 2, class_list=str(class_list))
    by_prefix = build_manifest(str(stanford), 0, 3, 2, class_list=str(class_list))
    assert {(r["label"], r["class_name"]) for r in rows(by_prefix)} == {(0, "Chihuahua"), (1, "Japanese spaniel")}
    assert {(r["label"], r["class_name"]) for r in rows(by_prefix)} == {(r["label"], r["class_name"]) for r in rows(by_id)}
    assert all(r["sample_id"].startswith(("n02085620-Chihuahua/", "n02085782-Japanese_spaniel/")) for r in rows(by_prefix))
    ambiguous = make_tree(tmp_path / "ambiguous", {"n02085620-a": 6, "n02085620-b": 6, "n02085782": 6})
    with pytest.raises(DatasetError, match="matches several folders"):
        build_manifest(str(ambiguous), 0, 3, 2, class_list=str(class_list))
