"""Dataset images decoded into the upright 8-bit RGB picture a model sees, or why one cannot be.

The manifest check (dataset.py) and extraction (extract.py) both call `open_rgb`, so an image
that passes the check decodes the same way in the forward pass. A source is a file path or the
encoded bytes of an image stored inside a table.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image, ImageOps

# PIL's decompression-bomb threshold (89,478,485 pixels). PIL itself only warns up to twice
# this size and raises beyond; here anything above it is refused, so a 20,000 x 20,000 image
# never gets to allocate 1.2 GB per decode.
MAX_PIXELS = 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_TRANSPARENT = ("RGBA", "RGBa", "LA", "La", "PA")
# What a corrupt or mislabelled file raises while PIL opens and decodes it.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

ImageSource = str | os.PathLike | bytes


class ImageDecodeError(ValueError):
    """An image that cannot be turned into RGB pixels; the message says why."""


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    name = os.fspath(source)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageDecodeError(
            f"file name is not valid UTF-8 ({os.fsencode(name)!r}); sample ids and the manifest are UTF-8: rename it"
        ) from None
    return Image.open(name)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB pixels of any PIL mode: 16-bit grey scaled (PIL's own conversion clips it at 255,
    turning most 16-bit photos white), transparency composited on white as transformers'
    `convert_to_rgb` does, everything else through PIL's conversion (CMYK, palette, grey)."""
    if image.mode in _SIXTEEN_BIT:
        grey = (np.asarray(image).astype(np.uint32) + 128) // 257
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ImageDecodeError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels (mode {image.mode}) "
                               "have no agreed 8-bit scaling; convert the image to 8 or 16 bits")
    if image.mode in _TRANSPARENT or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(source: ImageSource) -> Image.Image:
    """The image as the model sees it, fully read into memory (the file is closed at once).

    Upright (EXIF orientation applied, as viewers show photos), the first frame of an animation,
    8-bit RGB (see `to_rgb`). Raises ImageDecodeError for a file that is not an image, is cut
    short, is larger than MAX_PIXELS or has a name that is not UTF-8.
    """
    try:
        with _open(source) as image:
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise ImageDecodeError(
                    f"{image.width} x {image.height} = {pixels:,} pixels exceeds the decompression-bomb limit of "
                    f"{MAX_PIXELS:,}; downscale the image"
                )
            image.seek(0)
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{err}; images above {MAX_PIXELS:,} pixels are refused: downscale it") from err
    except DECODE_ERRORS as err:
        raise ImageDecodeError(f"{type(err).__name__}: {err}") from err


def image_error(source: ImageSource) -> str | None:
    """None when `open_rgb` decodes the image and it passes PIL's integrity check (PNG
    checksums and the like), else why not (one line)."""
    try:
        open_rgb(source)
        with _open(source) as image:
            image.verify()
    except ImageDecodeError as err:
        return str(err)
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None
