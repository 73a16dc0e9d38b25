"""Qwen2-VL processor that works without torchvision.

In transformers 5.x `Qwen2VLProcessor` requires a video processor, which exists only with
torchvision; without it `AutoProcessor` raises (or returns the bare tokenizer). stagelens only
feeds images, so where torchvision is missing it uses an image-only subclass that goes through
the very same image code path, with the image processor pinned to its PIL backend.
"""

from __future__ import annotations

import importlib.util
import os

from transformers import AutoProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


def torchvision_available() -> bool:
    """True where torchvision is importable (never imported here: a CUDA build fails on CPU torch)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor; images and text behave identically."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def cap_max_pixels(image_processor, max_pixels: int) -> None:
    """Cap the pixels (so the image tokens) per image: size.longest_edge is Qwen2-VL's max_pixels.

    Set on the loaded image processor rather than passed as a call kwarg (deprecated in 5.x);
    min_pixels is lowered to the cap where it was above it.
    """
    from transformers.image_processing_utils import SizeDict

    size = {k: v for k, v in dict(image_processor.size).items() if v is not None}
    size["longest_edge"] = int(max_pixels)
    size["shortest_edge"] = min(int(size.get("shortest_edge", max_pixels)), int(max_pixels))
    image_processor.size = SizeDict(**size)


def load_qwen2_vl_processor(path: str | os.PathLike, revision: str | None = None, max_pixels: int | None = None):
    """AutoProcessor where torchvision exists; the image-only processor (PIL backend) otherwise.

    A checkpoint saved without a video processor (the tiny recipes built without torchvision)
    also takes the image-only path. max_pixels, where given, caps the image tokens.
    """
    processor = None
    if torchvision_available():
        try:
            processor = AutoProcessor.from_pretrained(path, revision=revision)
        except OSError as err:
            if "video processor" not in str(err):
                raise
            processor = Qwen2VLImageOnlyProcessor.from_pretrained(path, revision=revision)
    else:
        processor = Qwen2VLImageOnlyProcessor.from_pretrained(path, revision=revision, backend="pil")
    if max_pixels is not None:
        cap_max_pixels(processor.image_processor, max_pixels)
    return processor
