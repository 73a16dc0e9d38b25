"""The typed per-model spec: every setting the library reads about one model, built once from a
validated config entry (schema defaults already filled in), so no code re-applies defaults by hand.

Field defaults equal the schema's (tests/test_spec.py holds them together); `None` means "take it
from the checkpoint" where the schema has no default (num_layers, layers, revision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Model dtypes (the schema's models.*.dtype enum) and storage dtypes of the vectors.
DTYPES = ("float32", "bfloat16", "float16")
VECTOR_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """One model as extraction sees it: what to load, how, and what to keep."""

    name: str  # the config's model name (output folders, rule names)
    checkpoint: str  # hub id or local checkpoint directory the adapter loads
    num_layers: int | None = None  # decoder blocks L the config expects; None: not checked
    layers: tuple[int, ...] | None = None  # layers kept; None: every layer 0..L of the checkpoint
    positions: tuple[str, ...] = ("last", "image_mean")
    dtype: str = "float32"
    vector_dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 4
    revision: str | None = None  # hub revision; None: the default branch (local: "local")
    max_pixels: int | None = None
    trust_remote_code: bool = False
    vision_num_layers: int | None = None  # vision-encoder blocks V; None: no vision layers read
    vision_layers: tuple[int, ...] | None = None  # vision layers kept; None: every layer 0..V

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any], checkpoint: str | None = None) -> "ModelSpec":
        """The spec of a validated `models.<name>` entry; `checkpoint` is where a recipe model was built."""
        source = checkpoint if checkpoint is not None else entry.get("path")
        if source is None:
            raise ValueError(f"models.{name}: a recipe model needs the directory it was built into")
        return cls(
            name=name,
            checkpoint=str(source),
            num_layers=int(entry["num_layers"]),
            layers=tuple(model_layers(entry)),
            positions=tuple(entry["positions"]),
            dtype=entry["dtype"],
            vector_dtype=entry["vector_dtype"],
            device=entry["device"],
            batch_size=int(entry["batch_size"]),
            revision=entry.get("revision") or None,
            max_pixels=entry.get("max_pixels"),
            trust_remote_code=bool(entry["trust_remote_code"]),
            vision_num_layers=entry.get("vision_num_layers"),
            vision_layers=tuple(model_vision_layers(entry)) if entry.get("vision_num_layers") is not None else None,
        )

    def layers_of(self, checkpoint_layers: int) -> list[int]:
        """The layers to keep, given the checkpoint's decoder-block count."""
        return list(self.layers) if self.layers is not None else list(range(checkpoint_layers + 1))

    def vision_layers_of(self) -> list[int]:
        """The vision layers to keep ([]: the vision tower is not read)."""
        if self.vision_num_layers is None:
            return []
        return list(self.vision_layers) if self.vision_layers is not None else list(range(self.vision_num_layers + 1))


def model_layers(entry: Mapping[str, Any]) -> list[int]:
    """Layers a config model entry is extracted and probed at: the explicit list, else 0..num_layers."""
    layers = entry.get("layers")
    if layers is None:
        return list(range(int(entry["num_layers"]) + 1))
    return sorted(int(layer) for layer in layers)


def model_vision_layers(entry: Mapping[str, Any]) -> list[int]:
    """Vision layers a config model entry reads and probes: the explicit list, else 0..vision_num_layers
    ([] when vision_num_layers is null: no vision-tower probes)."""
    if entry.get("vision_num_layers") is None:
        return []
    layers = entry.get("vision_layers")
    if layers is None:
        return list(range(int(entry["vision_num_layers"]) + 1))
    return sorted(int(layer) for layer in layers)


def vector_dtype_problem(vector_dtype: str, dtype: str) -> str | None:
    """Why a vector storage dtype does not fit a model dtype (None: it fits).

    float16 storage only for 16-bit models: it would silently round a float32 model's vectors.
    """
    if vector_dtype == "float16" and dtype == "float32":
        return "float16 vectors need a 16-bit model dtype (bfloat16 or float16); got dtype float32"
    return None


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available, else "cpu"; an explicit CUDA device must be available."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def torch_dtype(name: str):
    """The torch dtype of a config dtype name."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, name)
