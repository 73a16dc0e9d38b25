"""Processors that work without torchvision.

In transformers 5.x the processors of video-capable families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
GLM-4.1V, InternVL, SmolVLM, LLaVA-OneVision) require a video processor, which exists only with
torchvision; without it `AutoProcessor` raises (or returns the bare tokenizer). stagelens only
feeds images, so where torchvision is missing it uses an image-only subclass that goes through
the very same image code path, with the image processor pinned to its PIL backend. Pixtral's
processor (Mistral 3) is unimportable without torchvision only through one helper import, which
its PIL image processor's module also defines (`transformers_processor`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys

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


@functools.cache
def image_only_processor(processor_class: type) -> type:
    """A subclass of `processor_class` without its video processor (which needs torchvision).

    ProcessorMixin derives a processor's parts and saved settings from the parameter names of
    its __init__ code, so the subclass gets a generated __init__ with the class's parameters
    minus `video_processor`: from_pretrained then loads (and save_pretrained writes) the image
    processor, the tokenizer and the family's settings only. Images go through the class's own
    code unchanged; chat templates render through ProcessorMixin, skipping overrides that only
    fill in video defaults (SmolVLM).
    """
    params = [
        p for name, p in inspect.signature(processor_class.__init__).parameters.items()
        if name not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    names = [p.name for p in params]
    defaults = {p.name: None if p.default is p.empty else p.default for p in params}
    source = (
        f"def __init__(self, {', '.join(f'{n}=_defaults[{n!r}]' for n in names)}, **kwargs):\n"
        f"    _cls.__init__(self, video_processor=None, {', '.join(f'{n}={n}' for n in names)}, **kwargs)\n"
    )
    namespace: dict = {"_cls": processor_class, "_defaults": defaults}
    exec(source, namespace)  # noqa: S102 - source built from the class's own parameter names
    return type(
        f"{processor_class.__name__}ImageOnly",
        (processor_class,),
        {"__init__": namespace["__init__"], "apply_chat_template": ProcessorMixin.apply_chat_template},
    )


def transformers_processor(name: str, pil_twin: tuple[str, str, str] = ()) -> type:
    """The transformers processor class `name`, imported without torchvision where `pil_twin` allows.

    `pil_twin` (the table's fact: processor module, torchvision-only module it imports a helper
    from, PIL module defining the same helper, under transformers.models): without torchvision the
    PIL module stands in for the torchvision-only one while the processor's module is imported,
    then leaves sys.modules, so nothing else can import it by the wrong name.
    """
    import transformers

    if not pil_twin or torchvision_available():
        return getattr(transformers, name)
    processor_module, torchvision_module, pil_module = (f"transformers.models.{m}" for m in pil_twin)
    sys.modules[torchvision_module] = importlib.import_module(pil_module)
    try:
        module = importlib.import_module(processor_module)
    finally:
        del sys.modules[torchvision_module]
    return getattr(module, name)


# Kept by name: checkpoints and tests built without torchvision use it directly.
Qwen2VLImageOnlyProcessor = image_only_processor(Qwen2VLProcessor)


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


def load_processor(
    path: str | os.PathLike,
    processor_class: str | None,
    image_only: bool,
    revision: str | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    pil_twin: tuple[str, str, str] = (),
):
    """AutoProcessor where torchvision exists; else the PIL backend, through the image-only
    subclass of `processor_class` where the family's processor insists on a video processor, or
    through `processor_class` imported with its PIL twin (`transformers_processor`).

    A checkpoint saved without a video processor (the tiny recipes built without torchvision)
    also takes the image-only path on a torchvision machine. max_pixels, where given, caps the
    image tokens (Qwen2-VL-style processors).
    """
    import transformers

    def image_only_class():
        return image_only_processor(getattr(transformers, processor_class))

    if torchvision_available():
        try:
            processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as err:
            if not image_only or "video processor" not in str(err):
                raise
            processor = image_only_class().from_pretrained(path, revision=revision)
    elif image_only:
        processor = image_only_class().from_pretrained(path, revision=revision, backend="pil")
    elif pil_twin:
        processor = transformers_processor(processor_class, pil_twin).from_pretrained(path, revision=revision, backend="pil")
    else:
        processor = AutoProcessor.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, backend="pil"
        )
    if max_pixels is not None:
        cap_max_pixels(processor.image_processor, max_pixels)
    return processor
