"""Model loading: `load_adapter(model_cfg, model_path)` dispatches on the checkpoint's config.

Loaders are registered per config `model_type`. The built-in ones cover LLaVA-1.5, LLaVA-NeXT
and Qwen2-VL; any other transformers checkpoint goes through AutoModelForImageTextToText.
Modules in `ADAPTER_MODULES` (e.g. the embedded model) are imported when a checkpoint's
model_type is not registered yet, so they can call `register_adapter` for their own type
(and a plugin's dependencies are never needed to load a transformers model).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from typing import Callable

from stagelens.models.base import ModelAdapter

Loader = Callable[[dict, str], ModelAdapter]

# Modules that register adapters for their own checkpoint formats when imported.
ADAPTER_MODULES = ("stagelens.models.embedded",)

_REGISTRY: dict[str, Loader] = {}
_plugins_loaded = False


def register_adapter(model_type: str, loader: Loader) -> None:
    """Route checkpoints whose config.json has this `model_type` to `loader(model_cfg, model_path)`."""
    _REGISTRY[model_type] = loader


def registered_model_types() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in ADAPTER_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _builtin(arch_name: str) -> Loader:
    def load(model_cfg: dict, model_path: str) -> ModelAdapter:
        from stagelens.models import hf

        return hf.load_hf_adapter(model_cfg, model_path, getattr(hf, arch_name))

    return load


def _generic(model_cfg: dict, model_path: str) -> ModelAdapter:
    from stagelens.models import hf

    return hf.load_hf_adapter(model_cfg, model_path, None)


register_adapter("llava", _builtin("LLAVA"))
register_adapter("llava_next", _builtin("LLAVA_NEXT"))
register_adapter("qwen2_vl", _builtin("QWEN2_VL"))


def checkpoint_config(model_path: str, revision: str | None = None) -> dict:
    """The raw config.json of a local directory or hub id (hub: from the local cache or the hub)."""
    from transformers.utils import cached_file

    resolved = cached_file(model_path, "config.json", revision=revision)
    with open(resolved, encoding="utf-8") as fh:
        return json.load(fh)


def load_adapter(model_cfg: dict, model_path: str) -> ModelAdapter:
    """The adapter for one config model entry; dispatch on config.json's model_type.

    Unregistered model types go through the generic AutoModelForImageTextToText path.
    """
    config = checkpoint_config(model_path, model_cfg.get("revision") or None)
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"{model_path}: config.json has no model_type")
    if model_type not in _REGISTRY:
        _load_plugins()
    return _REGISTRY.get(model_type, _generic)(model_cfg, model_path)
