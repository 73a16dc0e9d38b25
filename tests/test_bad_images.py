"""Bad data: every odd or broken image either decodes to the right RGB pixels or fails with the
file named, and a dataset's broken files are all reported in one error (or counted when skipped)."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagelens.dataset import DatasetError, build_manifest, candidate_order, manifest_metadata, write_manifest
from stagelens.image_sources import list_images
from stagelens.extract import load_image
from stagelens.images import MAX_PIXELS, ImageDecodeError, image_error, open_rgb


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def blocks(height: int = 32, width: int = 48) -> np.ndarray:
    """An RGB picture of four flat quadrants (survives JPEG well, shows any rotation)."""
    out = np.zeros((height, width, 3), np.uint8)
    out[: height // 2, : width // 2] = (220, 30, 30)
    out[: height // 2, width // 2 :] = (30, 220, 30)
    out[height // 2 :, : width // 2] = (30, 30, 220)
    out[height // 2 :, width // 2 :] = (230, 230, 30)
    return out


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side white pixels: a few kB on disk, side^2 pixels decoded."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.compress(row * (side % 1000))
    body += packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


# --- files that must decode, and to what ---------------------------------------------------------


def test_cmyk_jpeg_decodes_to_the_same_colours():
    rgb = Image.fromarray(blocks())
    cmyk = open_rgb(encoded(rgb.convert("CMYK"), "JPEG", quality=95))
    assert np.abs(pixels(cmyk) - blocks().astype(int)).mean() < 6


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    source = encoded(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(source)).mode == "I;16"
    got = pixels(open_rgb(source))
    expected = np.round(ramp / 257).astype(int)  # 65535 -> 255, 257 k -> k
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=2))
    # PIL's own conversion clips at 255: almost the whole ramp would turn white.
    assert (np.asarray(Image.open(io.BytesIO(source)).convert("RGB")) == 255).mean() > 0.9


def test_palette_png_and_its_transparency():
    picture = Image.fromarray(blocks()).quantize(colors=4)
    assert pixels(open_rgb(encoded(picture, "PNG"))).tolist() == pixels(picture.convert("RGB")).tolist()
    with_hole = picture.copy()
    hole = int(np.asarray(picture)[0, 0])  # the top-left quadrant's palette index
    got = pixels(open_rgb(encoded(with_hole, "PNG", transparency=hole)))
    assert (got[:16, :24] == 255).all()  # transparent -> white, as transformers' convert_to_rgb
    assert (got[16:, 24:] == pixels(picture.convert("RGB"))[16:, 24:]).all()


def test_animated_gif_gives_its_first_frame():
    first = Image.new("RGB", (20, 20), (200, 0, 0))
    second = Image.new("RGB", (20, 20), (0, 0, 200))
    source = encoded(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(source)).n_frames == 2
    got = pixels(open_rgb(source))
    assert got[..., 0].min() > 150 and got[..., 2].max() < 50


def test_exif_rotated_photo_is_upright():
    stored = Image.fromarray(blocks(32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    got = pixels(open_rgb(encoded(stored, "JPEG", quality=95, exif=exif.tobytes())))
    assert got.shape == (48, 32, 3)
    assert np.abs(got - np.rot90(blocks(32, 48), k=-1).astype(int)).mean() < 6


def test_extraction_reads_images_the_same_way(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert np.array_equal(pixels(load_image(str(tmp_path / "deep.png"))), pixels(open_rgb(tmp_path / "deep.png")))
    (tmp_path / "bad.png").write_text("hello")
    with pytest.raises(ImageDecodeError, match=r"cannot read image .*bad\.png: UnidentifiedImageError"):
        load_image(str(tmp_path / "bad.png"))


# --- files that must fail, with the file named ---------------------------------------------------


def broken_files(directory: Path) -> dict[str, str]:
    """name -> a pattern its error must match."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    (directory / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (directory / "empty.png").write_bytes(b"")
    (directory / "notes.png").write_text("this is text, not a picture\n")
    (directory / "bomb.png").write_bytes(bomb_png(20_000))
    os.symlink("loop.png", directory / "loop.png")
    return {
        "truncated.jpg": "truncated",
        "empty.png": "UnidentifiedImageError",
        "notes.png": "UnidentifiedImageError",
        "bomb.png": f"exceeds .*{MAX_PIXELS:,}",
        "loop.png": "Too many levels of symbolic links",
    }


def test_each_broken_file_says_why(tmp_path):
    for name, pattern in broken_files(tmp_path).items():
        error = image_error(tmp_path / name)
        assert error is not None and re.search(pattern, error), (name, error)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(20_000))
    assert path.stat().st_size < 200_000  # 400 million pixels in a few kB
    with pytest.raises(ImageDecodeError, match="20000 x 20000|400000000 pixels"):
        open_rgb(path)
    # Just above the limit (where PIL itself only warns) is refused too.
    path.write_bytes(bomb_png(9_500))
    with pytest.raises(ImageDecodeError, match=f"9500 x 9500 = 90,250,000 pixels exceeds .* {MAX_PIXELS:,}"):
        open_rgb(path)


def non_utf8_name(directory: Path) -> bytes:
    name = os.fsencode(directory) + b"/caf\xe9.png"
    with open(name, "wb") as fh:
        fh.write(encoded(Image.new("RGB", (8, 8)), "PNG"))
    return name


def good_tree(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(1)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(root / cls / f"img{i:02d}.png")
    return root


def test_all_broken_files_of_a_dataset_in_one_error(tmp_path):
    root = good_tree(tmp_path / "images", {"cat": 3, "dog": 6})
    expected = broken_files(root / "cat")
    (root / "dog" / "zero.png").write_bytes(b"")
    non_utf8_name(root / "dog")
    # Every file is needed, so every broken one is met.
    with pytest.raises(DatasetError) as info:
        build_manifest(str(root), 0, 4, 4)
    message = str(info.value)
    assert message.startswith("7 unreadable image(s)")
    for name, pattern in expected.items():
        assert re.search(rf"unreadable image cat/{name}: .*{pattern}", message), (name, message)
    assert "unreadable image dog/zero.png: UnidentifiedImageError" in message
    assert "b'" in message and "caf\\xe9.png" in message and "not valid UTF-8" in message


def test_skipping_counts_every_broken_file(tmp_path):
    root = good_tree(tmp_path / "images", {"cat": 8, "dog": 8})
    broken = broken_files(root / "cat")
    non_utf8_name(root / "dog")
    # A seed whose last candidate in each class is readable, so the split meets every broken file.
    listed = {cls: list_images(root / cls) for cls in ("cat", "dog")}
    seed = next(s for s in range(100) if all(candidate_order(files, cls, s)[-1].startswith("img")
                                             for cls, files in listed.items()))
    table = build_manifest(str(root), seed, 6, 2, on_broken_image="skip")
    out = tmp_path / "manifest.parquet"
    write_manifest(table, out)  # the manifest is plain UTF-8: no broken name made it in
    meta = manifest_metadata(out)
    assert meta["n_skipped_broken"] == len(broken) + 1
    assert {Path(item["path"]).name for item in meta["skipped_broken"] if "UTF-8" not in item["error"]} == set(broken)
    assert meta["counts"] == {"cat": {"train": 6, "test": 2}, "dog": {"train": 6, "test": 2}}


def test_symlink_loops_among_folders(tmp_path):
    root = good_tree(tmp_path / "images", {"cat": 3, "dog": 3})
    os.symlink(".", root / "cat" / "again")  # a folder loop inside a class is not followed
    assert build_manifest(str(root), 0, 2, 1).num_rows == 6
    os.symlink("ghost", root / "ghost")  # a class folder that leads nowhere is an error, not a lost class
    with pytest.raises(DatasetError, match=r"images/ghost: symbolic link to nowhere"):
        build_manifest(str(root), 0, 2, 1)


def test_non_utf8_class_folder_is_named(tmp_path):
    root = good_tree(tmp_path / "images", {"cat": 3})
    os.mkdir(os.fsencode(root) + b"/chien\xe9")
    with pytest.raises(DatasetError, match=r"chien\\xe9': name is not valid UTF-8"):
        build_manifest(str(root), 0, 2, 1)
