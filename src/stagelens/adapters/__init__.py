"""What reads models: `load_adapter(spec)` picks the adapter by the checkpoint's
config.json `model_type` from one explicit table (no registry, no import side effects).

transformers families are looked up in `architectures.ARCHITECTURES` (where their parts are,
what their forward needs, why one cannot be read); the embedded model has its own loader; any
other transformers checkpoint goes through AutoModelForImageTextToText.
Loader modules are imported on use, so loading a transformers model never needs the embedded
model's vision package and vice versa.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Callable

from stagelens.adapters.base import ModelAdapter
from stagelens.spec import ModelSpec

Loader = Callable[[ModelSpec], ModelAdapter]

EMBEDDED_MODEL_TYPE = "stagelens-embedded"


def loader_for(model_type: str) -> Loader:
    """The function that loads checkpoints whose config.json has this `model_type`."""
    if model_type == EMBEDDED_MODEL_TYPE:
        from stagelens.adapters.embedded import load_embedded_adapter

        return load_embedded_adapter
    from stagelens.adapters import hf
    from stagelens.adapters.architectures import facts_for

    return partial(hf.load_hf_adapter, facts=facts_for(model_type))


def checkpoint_config(model_path: str, revision: str | None = None) -> dict:
    """The raw config.json of a local directory or hub id (hub: from the local cache or the hub)."""
    from transformers.utils import cached_file

    resolved = cached_file(model_path, "config.json", revision=revision)
    with open(resolved, encoding="utf-8") as fh:
        return json.load(fh)


def load_adapter(spec: ModelSpec) -> ModelAdapter:
    """The adapter for one model; dispatch on its checkpoint's config.json model_type."""
    config = checkpoint_config(spec.checkpoint, spec.revision)
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"{spec.checkpoint}: config.json has no model_type")
    return loader_for(model_type)(spec)
