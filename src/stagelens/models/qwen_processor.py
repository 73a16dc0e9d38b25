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


def load_qwen2_vl_processor(path: str | os.PathLike, revision: str | None = None, **image_kwargs):
    """AutoProcessor where torchvision exists; the image-only processor (PIL backend) otherwise.

    image_kwargs (e.g. max_pixels) override the saved image processor settings. A checkpoint
    saved without a video processor (the tiny recipes built without torchvision) also takes
    the image-only path.
    """
    if torchvision_available():
        try:
            return AutoProcessor.from_pretrained(path, revision=revision, **image_kwargs)
        except OSError as err:
            if "video processor" not in str(err):
                raise
        return Qwen2VLImageOnlyProcessor.from_pretrained(path, revision=revision, **image_kwargs)
    return Qwen2VLImageOnlyProcessor.from_pretrained(path, revision=revision, backend="pil", **image_kwargs)
